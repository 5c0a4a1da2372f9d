/**
 * The RPC fuzzer, shared by the test suite (test/rpc.test.ts, ≥ 20,000 frames) and
 * bench/fuzz-rpc (≥ 1,000,000 frames). It records what a real client sends in valid
 * sessions (through a recording proxy), then opens connection after connection to a
 * server and sends those frames mutated: bit flips in bodies and headers, boundary values
 * written over size, offset, shape and id fields, truncated frames, huge lengths, wrong
 * buffer ids, frames out of order. Each connection ends with a PING that must be answered
 * (or the connection closed by the server) within a deadline: a server that stops
 * answering is a hang. A crash is the server process gone.
 */
import { connect, createServer, Socket } from "node:net";
import { readFileSync } from "node:fs";
import { Cmd, FrameReader, Kind, PROTOCOL_VERSION, Writer, frame, tablesDigest } from "../lib/rpc/protocol.js";
import { mulberry32 } from "../lib/core/random.js";
import { loadModel } from "../lib/model/model.js";
import { metaDevice } from "../lib/meta/index.js";
import { RpcDevice, openRpcServer, startRpcServer } from "../lib/rpc/index.js";

/** One recorded client→server frame (header and body as sent). */
export interface RecordedFrame { readonly cmd: number; readonly bytes: Uint8Array }

/**
 * The sessions both fuzzers replay, recorded against `endpoint`: a client running each of
 * `models` there (load, a prompt, a token, a memory query), and `splitModel` tensor-split
 * over another server and this one as rank 1 (GROUP, PREPARE, graphs with ALL_REDUCE
 * nodes). That other server is closed before this returns, so replayed groups fail to link.
 */
export async function recordClientSessions(endpoint: string, models: readonly string[], splitModel: string): Promise<RecordedFrame[][]> {
  const run = async (devices: RpcDevice[], path: string) => {
    const m = await loadModel(path, { threads: 1, devices: devices.length > 1 ? [metaDevice(devices)] : devices, contextSize: 64, batchSize: 4 });
    await m.evaluate([1, 2, 3, 4, 5, 6], { allLogits: true });
    await m.evaluate([7]);
    await m.dispose();
    await devices[devices.length - 1]!.updateMemory();
    for (const d of devices) d.conn.close();
  };
  const sessions: RecordedFrame[][] = [];
  for (const path of models)
    sessions.push(await recordSession(endpoint, async (proxy) => run((await openRpcServer(proxy)) as RpcDevice[], path)));
  const rank0 = await startRpcServer({ port: 0, threads: 1 });
  try {
    sessions.push(await recordSession(endpoint, async (proxy) =>
      run([...(await openRpcServer(rank0.endpoint)), ...(await openRpcServer(proxy))] as RpcDevice[], splitModel)));
  } finally { await rank0.close(); }
  return sessions;
}

/**
 * Runs `session` against a proxy in front of `endpoint` and returns every frame the client
 * sent after its HELLO (the fuzzer sends its own valid HELLO first).
 */
export async function recordSession(endpoint: string, session: (proxyEndpoint: string) => Promise<void>): Promise<RecordedFrame[]> {
  const [host, port] = [endpoint.slice(0, endpoint.lastIndexOf(":")), Number(endpoint.slice(endpoint.lastIndexOf(":") + 1))];
  const frames: RecordedFrame[] = [];
  const proxy = createServer((client) => {
    const upstream = connect({ host, port });
    const reader = new FrameReader(() => Number.MAX_SAFE_INTEGER);
    client.on("data", (d: Buffer) => {
      for (const { h, body } of reader.push(d)) {
        if (h.cmd === Cmd.HELLO || h.cmd === Cmd.AUTH) continue;
        frames.push({ cmd: h.cmd, bytes: new Uint8Array(Buffer.concat(frame(Kind.REQUEST, h.cmd, h.id, body))) });
      }
      upstream.write(d);
    });
    upstream.on("data", (d) => client.write(d));
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
    client.on("error", () => {}); upstream.on("error", () => {});
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
  try {
    await session(`127.0.0.1:${(proxy.address() as { port: number }).port}`);
  } finally {
    await new Promise<void>((r) => proxy.close(() => r()));
  }
  return frames;
}

const BOUNDARY = [0n, 1n, 7n, 0xffn, 0xffffn, 0x7fffffffn, 0xffffffffn, 0x100000000n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n];

/** Mutations after which the server can no longer find frame boundaries (it ends the connection, or waits for the rest). */
export const STREAM_BREAKING = new Set(["bad kind or magic", "huge length", "cut mid-frame"]);

/**
 * A mutated copy of a recorded frame, and what was done (for the statistics); with
 * `breaking`, a mutation that leaves the stream out of step (the connection's last frame).
 */
export function mutate(f: RecordedFrame, r: () => number, breaking = false): { bytes: Uint8Array; kind: string } {
  if (breaking) {
    const b = new Uint8Array(f.bytes);
    const dv = new DataView(b.buffer);
    const pick = r();
    if (pick < 0.4) { if (r() < 0.5) dv.setUint8(4, 1 + Math.floor(r() * 3)); else dv.setUint32(0, Math.floor(r() * 2 ** 32)); return { bytes: b, kind: "bad kind or magic" }; }
    if (pick < 0.7) { dv.setBigUint64(12, BOUNDARY[6 + Math.floor(r() * 6)]!, true); return { bytes: b, kind: "huge length" }; }
    return { bytes: b.slice(0, Math.floor(r() * b.length)), kind: "cut mid-frame" };
  }
  const b = new Uint8Array(f.bytes);  // a copy (Buffer.slice would be a view of the recording)
  const body = 20;
  const pick = r();
  const at = (n: number) => body + Math.floor(r() * Math.max(1, b.length - body - n + 1));
  if (pick < 0.25 && b.length > body) {
    const flips = 1 + Math.floor(r() * 8);
    for (let i = 0; i < flips; i++) { const k = at(1); if (k < b.length) b[k]! ^= 1 << Math.floor(r() * 8); }
    return { bytes: b, kind: "body bit flips" };
  }
  if (pick < 0.45 && b.length >= body + 8) {
    const v = BOUNDARY[Math.floor(r() * BOUNDARY.length)]!;
    const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const k = at(8);
    if (r() < 0.5) dv.setBigUint64(k, v, true); else dv.setUint32(k, Number(v & 0xffffffffn), true);
    return { bytes: b, kind: "boundary value in a field" };
  }
  if (pick < 0.55 && b.length >= body + 4) {
    new DataView(b.buffer, b.byteOffset).setUint32(body, Math.floor(r() * 64), true);  // most bodies start with a buffer id
    return { bytes: b, kind: "wrong buffer id" };
  }
  if (pick < 0.65) {
    // a shorter body, header adjusted: every field read past it must fail cleanly
    const keep = Math.floor(r() * Math.max(0, b.length - body));
    const out = b.slice(0, body + keep);
    new DataView(out.buffer).setBigUint64(12, BigInt(keep), true);
    return { bytes: out, kind: "truncated body" };
  }
  if (pick < 0.8) {
    const dv = new DataView(b.buffer, b.byteOffset);
    if (r() < 0.5) dv.setUint8(5, Math.floor(r() * 24));  // another (or no) command with this body
    else dv.setUint32(8, Math.floor(r() * 2 ** 32), true);  // another request id
    return { bytes: b, kind: "header command or id" };
  }
  // a frame from elsewhere in the session: out of order
  return { bytes: b, kind: "out of order" };
}

export interface FuzzOptions {
  host: string;
  port: number;
  /** recorded sessions to draw frames from */
  sessions: RecordedFrame[][];
  /** frames to send in all */
  frames: number;
  seed?: number;
  /** frames per connection (default 60) */
  perConnection?: number;
  /** connections open at once (default 4) */
  parallel?: number;
  /** how long the final PING of a connection may take (default 10 s) */
  deadlineMs?: number;
  /** the server's pid: its RSS is sampled */
  pid?: number;
  onProgress?: (sent: number) => void;
}

export interface FuzzResult {
  frames: number;
  connections: number;
  replies: number;
  errorReplies: number;
  /** connections that ended before their PING was answered (a malformed frame ends one) */
  closedByServer: number;
  /** connections whose PING went unanswered though the stream was intact, and probes (fresh clients) not answered */
  hangs: number;
  kinds: Record<string, number>;
  rssKiB: number[];
  ms: number;
}

export function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) : NaN;
}

function hello(): Uint8Array {
  return Buffer.concat(frame(Kind.REQUEST, Cmd.HELLO, 1, new Writer().u32(PROTOCOL_VERSION).str("fuzzer").str(tablesDigest()).body()));
}
const PING_ID = 0xfffffff0;

/** One connection: a valid HELLO, then frames (valid in recorded order, or mutated), then a PING. */
function fuzzConnection(o: FuzzOptions, r: () => number, n: number, res: FuzzResult): Promise<void> {
  return new Promise<void>((resolve) => {
    const sock: Socket = connect({ host: o.host, port: o.port, noDelay: true });
    const reader = new FrameReader(() => Number.MAX_SAFE_INTEGER);
    let done = false, pinged = false;
    const finish = (how: "closed" | "answered" | "hang") => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (how === "closed") res.closedByServer++;
      if (how === "hang") res.hangs++;
      sock.destroy();
      resolve();
    };
    let broken = false;
    // a connection left mid-frame is the client's stall, not the server's: it is simply dropped
    const timer = setTimeout(() => finish(broken ? "closed" : pinged ? "hang" : "closed"), o.deadlineMs ?? 10_000);
    sock.on("data", (d: Buffer) => {
      let frames;
      try { frames = reader.push(d); } catch { return finish("closed"); }
      for (const { h, body } of frames) {
        if (h.kind !== Kind.REPLY) continue;
        res.replies++;
        if (body[0] === 1) res.errorReplies++;
        if (h.id === PING_ID) return finish("answered");
      }
    });
    sock.on("error", () => {});
    sock.on("close", () => finish("closed"));
    sock.on("connect", () => {
      sock.write(hello());
      const s = o.sessions[Math.floor(r() * o.sessions.length)]!;
      let i = 0;
      // one connection in six ends with a frame that breaks the stream
      const breaks = r() < 1 / 6;
      for (let k = 0; k < n; k++) {
        // mostly the session in order (state builds up: buffers, graphs), with mutations mixed in
        const f = r() < 0.7 ? s[i++ % s.length]! : s[Math.floor(r() * s.length)]!;
        const last = k === n - 1;
        const m = breaks && last ? mutate(f, r, true) : r() < 0.5 ? { bytes: f.bytes, kind: "valid" } : mutate(f, r);
        res.kinds[m.kind] = (res.kinds[m.kind] ?? 0) + 1;
        res.frames++;
        sock.write(m.bytes);
        if (STREAM_BREAKING.has(m.kind)) broken = true;
      }
      pinged = true;
      sock.write(Buffer.concat(frame(Kind.REQUEST, Cmd.PING, PING_ID, new Uint8Array(0))));
      // the server cannot answer past a cut frame: it waits for the rest, so the client goes
      if (broken) setTimeout(() => finish("closed"), 200);
    });
  });
}

/** A fresh valid client: HELLO and PING answered within the deadline? */
function probe(o: FuzzOptions): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ host: o.host, port: o.port, noDelay: true });
    const reader = new FrameReader(() => Number.MAX_SAFE_INTEGER);
    const t = setTimeout(() => { sock.destroy(); resolve(false); }, o.deadlineMs ?? 10_000);
    sock.on("error", () => {});
    sock.on("data", (d: Buffer) => {
      for (const { h } of reader.push(d)) if (h.id === PING_ID) { clearTimeout(t); sock.destroy(); resolve(true); }
    });
    sock.on("connect", () => {
      sock.write(hello());
      sock.write(Buffer.concat(frame(Kind.REQUEST, Cmd.PING, PING_ID, new Uint8Array(0))));
    });
  });
}

/** Sends `o.frames` frames over as many connections as it takes; returns what happened. */
export async function fuzzServer(o: FuzzOptions): Promise<FuzzResult> {
  const r = mulberry32(o.seed ?? 1);
  const res: FuzzResult = { frames: 0, connections: 0, replies: 0, errorReplies: 0, closedByServer: 0, hangs: 0, kinds: {}, rssKiB: [], ms: 0 };
  const t0 = performance.now();
  const per = o.perConnection ?? 60, parallel = o.parallel ?? 4;
  let nextSample = 0;
  while (res.frames < o.frames) {
    const batch: Promise<void>[] = [];
    for (let p = 0; p < parallel && res.frames + p * per < o.frames; p++) {
      res.connections++;
      batch.push(fuzzConnection(o, r, Math.min(per, o.frames - res.frames), res));
    }
    await Promise.all(batch);
    if (!(await probe(o))) res.hangs++;
    o.onProgress?.(res.frames);
    if (o.pid && res.frames >= nextSample) { res.rssKiB.push(rssKiB(o.pid)); nextSample += o.frames / 20; }
  }
  if (o.pid) res.rssKiB.push(rssKiB(o.pid));
  res.ms = performance.now() - t0;
  return res;
}
