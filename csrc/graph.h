// A compute graph decoded from the plan TypeScript encodes (lib/cpu/plan.ts), validated
// once against the buffers it points into, cached by graph uid, executed on a pool.
// Ops are one table (OP_TABLE in graph.cpp: name, check, run); their ids and names, and
// the plan record layout below, are exported to TypeScript, which checks them against
// lib/core/ops.ts and lib/cpu/plan.ts when it loads the addon.
#pragma once
#include "common.h"
#include "threadpool.h"
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace weft {

// Op ids: the order of OP_TABLE (graph.cpp) and of lib/core/ops.ts (checked at load).
enum Op : int32_t {
  OP_NONE = 0, OP_GET_ROWS, OP_MUL_MAT, OP_ADD, OP_MUL, OP_SCALE, OP_RMS_NORM, OP_ROPE, OP_SOFT_MAX,
  OP_CPY, OP_CONT, OP_VIEW, OP_RESHAPE, OP_PERMUTE, OP_TRANSPOSE, OP_SET_ROWS, OP_UNARY, OP_GLU,
  OP_FLASH_ATTN_EXT, OP_ALL_REDUCE, OP_COUNT
};
enum Unary : int32_t { UNARY_SILU = 0, UNARY_GELU = 1, UNARY_RELU = 2 };
enum Glu : int32_t { GLU_SWIGLU = 0, GLU_GEGLU = 1 };
// ALL_REDUCE params: [group, rank, mode, inner, axis, offset, length]: this rank's slice
// [offset, offset+length) of an axis of `axis` steps of `inner` elements. SUM: every rank
// gets the whole sum; GATHER: every rank gets every slice (the source is this rank's
// slice); REDUCE_SCATTER: each rank gets the sum of its own slice (the source is whole);
// it may carry every rank's first index along the axis and the axis length after those
// seven (size + 1 bounds): ranks in other processes then send each other only the slices.
enum CollectiveMode : int32_t { COLL_SUM = 0, COLL_GATHER = 1, COLL_REDUCE_SCATTER = 2 };

const char* op_name(int32_t op);

// Plan record layout (doubles per tensor); exported as planLayout() and checked by lib/cpu/plan.ts.
constexpr int REC = 36;
constexpr int R_OP = 0, R_TYPE = 1, R_NE = 2, R_NB = 6, R_BUF = 10, R_OFFS = 11, R_SRC = 12, R_FLAGS = 15,
              R_NPARAMS = 16, R_PARAMS = 17, MAX_PARAMS = 16, MAX_SRC = 3;
constexpr int F_REPACKED = 1;  // R_FLAGS bit: the tensor lies in a repacked weight buffer

struct Group;

struct Tensor {
  int32_t op, type;
  int64_t ne[4];
  int64_t nb[4];
  char* data;
  int32_t src[MAX_SRC];
  double params[MAX_PARAMS];
  int32_t nparams;
  bool is_node;
  bool packed;     // weight rows repacked in groups of eight (R_FLAGS & F_REPACKED)
  Group* group;    // ALL_REDUCE: its communicator (kept alive by Plan::groups)
};

struct Plan {
  std::vector<Tensor> t;
  std::vector<int32_t> nodes;  // indices of tensors that compute (in order)
  std::vector<int64_t> buffers;  // ids of the buffers it reads and writes (pinned while it runs)
  std::vector<std::shared_ptr<Group>> groups;
  size_t wsize = 0;            // scratch bytes needed by MUL_MAT activation conversion
  size_t row_scratch = 0;      // per-thread bytes for row temporaries (widest row)
  size_t tile_scratch = 0;     // per-thread bytes for weight rows decoded before tiling
};

struct BufferInfo { char* base; size_t size; bool read_only; };
// Looks up a live buffer by id (addon.cpp owns the registry); false if unknown or freed.
bool lookup_buffer(int64_t id, BufferInfo* out);
// Looks up a collective group by id (addon.cpp owns the registry).
std::shared_ptr<Group> lookup_group(int64_t id);

// A communicator between CPU devices of this process: the ranks of one meta device's
// graph meet at its barrier, publish where their partials are, and each sums (or
// copies) its share of the elements for all of them.
struct Group {
  struct Slot { const char* src; char* dst; int64_t offset, length, elements; };
  explicit Group(int n) : size(n), barrier(n), slots(n) {}
  ~Group();
  const int size;
  Barrier barrier;
  std::vector<Slot> slots;
  std::string why;  // set once, before abort(): the failure every rank reports
  std::atomic<bool> failing{false};
  void fail(const std::string& msg);

  // Peer links (csrc/peer.cpp): the group of an RPC server with the other servers of one
  // meta device. Each rank is a process; partials cross TCP links, one per other rank.
  int self = -1;                 // this process's rank (>= 0: a networked group)
  int wire = 0;                  // how partial sums travel: WIRE_F32 / WIRE_F16 / WIRE_Q8_0
  std::vector<int> fds;          // per rank, the link's socket (-1 for self)
  int wake[2] = {-1, -1};        // fail() writes here: a rank waiting on the network wakes
  uint32_t seq = 0;              // collectives done: both ends of a link count alike
  std::vector<char> confirmed;   // per rank: the dialing side's LINK_UP marker arrived (see peer.cpp)
  std::vector<std::vector<char>> rx;   // per rank: what it sent (its partial, encoded)
  std::vector<std::vector<float>> dec; // per rank: that partial decoded (F16/Q8_0 wires)
  std::vector<std::vector<char>> txs;  // per rank: what this rank sends it, encoded
  std::vector<std::vector<float>> packs; // per rank: its slice of this rank's partial (sliced reduce-scatter)
  // Ranks on one host (all of them) pass parts through a shared mapping instead (peer.cpp),
  // agreed at the first collective; parts larger than shm_part still cross the links.
  bool shm_wanted = true;
  std::atomic<int> shm_state{0};  // 0: not agreed yet, 1: shared memory, -1: the links only
  char* shm = nullptr;
  size_t shm_size = 0, shm_part = 0;
  uint64_t shm_count = 0;        // collectives done through it (the same on every rank)
  bool networked() const { return self >= 0; }
};

enum WireType : int32_t { WIRE_F32 = 0, WIRE_F16 = 1, WIRE_Q8_0 = 2 };

// Canonical summation order of the ranks' partials (graph.cpp): every path adds in it.
void tree_sum(const char* const* src, int lo, int hi, int64_t e0, int64_t n, float* out, float* tmp);

// A networked group's ALL_REDUCE (peer.cpp), run by one thread: sends this rank's part to
// every peer, receives theirs, and combines them in tree order. False with `err` set on failure.
bool peer_all_reduce(Group& g, const Tensor& t, const Tensor& a, float* tmp, std::string& err);

// A networked group over the given sockets (each dup'd by peer_adopt_socket); null and
// `err` on failure.
// `shared_memory`: parts may go through a shared mapping where every rank is on this host.
std::shared_ptr<Group> make_peer_group(int size, int self, const std::vector<int>& fds, int wire, bool shared_memory, std::string& err);
// "pending" (no collective yet), "tcp" or "shared memory": how the group's parts travel.
const char* peer_transport(const Group& g);
// A private, non-blocking, close-on-exec duplicate of a connected TCP socket; -1 and `err` on failure.
int peer_adopt_socket(int fd, std::string& err);

// Decodes and validates; on error returns null and sets err to a message naming the node.
std::unique_ptr<Plan> decode_plan(const double* rec, int64_t count, std::string& err);

class ThreadPool;
// A plan run for a native RPC session (lane.cpp), on the calling thread as worker 0 of
// the device's pool (addon.cpp): REFUSED (nothing ran) when one of its buffers was freed.
// Only while the device's dispatcher is idle: the session's JS queue must be (a device
// runs one compute at a time), and this run is not counted among the device's computes
// that other devices wait for (CpuBackend's submitted counts the JS ones).
struct Context;
enum class NativeRun { OK, REFUSED, FAILED };
NativeRun run_plan_native(Context* ctx, const std::shared_ptr<Plan>& plan, std::string& err);
bool pin_buffer_ids(const std::vector<int64_t>& ids);
void unpin_buffer_ids(const std::vector<int64_t>& ids);
// Runs a plan; throws std::runtime_error on failure (after every thread has stopped).
void execute_plan(Plan& plan, ThreadPool& pool, std::vector<char>& scratch);

// Per-op time profile (WEFT_PROFILE=1): nanoseconds and calls by op (x weight type for
// MUL_MAT), accumulated by worker 0 between barriers.
struct OpProfile { double ns[OP_COUNT][32]; int64_t calls[OP_COUNT][32]; };
extern bool g_profile;
OpProfile& op_profile();

}  // namespace weft
