/** weft's public API. */
export { WeftError, type WeftErrorCode } from "./core/errors.js";
export { GgmlType, TYPES, rowSize, typeByName, type TypeTraits } from "./core/types.js";
export { Op, OPS, UnaryOp, GluOp, RopeMode, type OpName } from "./core/ops.js";
export { Tensor, TensorFlag, type Shape4 } from "./core/tensor.js";
export * as ops from "./core/graph.js";
export { Graph, buildGraph, newTensor } from "./core/graph.js";
export { setTensorData, getTensorData, setTensorAsync, getTensorAsync, copyTensorAsync, recordEvent, waitEvent } from "./backend/fallback.js";
export { allocateTensors, allocateWeights, allocGraph, type AllocateOptions } from "./backend/alloc.js";
export { BufferUsage, type Backend, type Buffer, type BufferType, type Device, type DeviceCaps, type DeviceType, type Event, type CollectiveGroup, type AllReduceType, type CollectiveOptions } from "./backend/interface.js";
export { Scheduler, ScheduledGraph, planLayerSplit } from "./backend/sched.js";
export { AXIS, MIRRORED, PARTIAL, type SplitState, describeState } from "./split/state.js";
export { planLlamaSplit } from "./split/plan.js";
export { SPLIT_RULES, type SplitRule } from "./split/rules.js";
export { MetaDevice, MetaBackend, type MetaOptions, type AllReducePath } from "./meta/index.js";
export { readGguf } from "./gguf/reader.js";
export { writeGguf, type GgufTensorSpec } from "./gguf/writer.js";
export { GgufValueType, type GgufFile, type GgufTensorInfo, type GgufValue } from "./gguf/types.js";
export { quantizeModel, planQuantTypes, QUANT_SCHEMES } from "./quant/quantize.js";
export { loadModel, loadTokenizer, Model, type LoadModelOptions, type LoadProgress, type EvaluateOptions, type GenerateOptions, type GeneratedPiece, type SplitMode, type DeviceUsage } from "./model/model.js";
export { Tokenizer, TokenType, type TokenizeOptions, type DetokenizeOptions } from "./tokenizer/tokenizer.js";
export { Sampler, argmax, type SamplingOptions } from "./model/sampling.js";
export { readHParams, type HParams, ARCHITECTURES } from "./model/hparams.js";
export { synthModel, SYNTH_PRESETS, SYNTH_TYPES, type SynthOptions } from "./model/synth.js";
export { defaultModelPath, cacheDir, DEFAULT_MODEL } from "./model/default.js";
export { planGraphAllocation, applyGraphAllocation, type GraphAllocation } from "./backend/alloc.js";

export { startRpcServer, RpcServer, RpcDevice, RpcConnection, readToken, DEFAULT_RPC_PORT, type RpcServerOptions, type RpcConnectOptions } from "./rpc/index.js";

import { device, devices } from "./backend/registry.js";
import { addRpcServer, closeRpcServers } from "./rpc/index.js";
import { deviceFromSpec, metaDevice } from "./meta/index.js";
/**
 * Devices: `backend.device("cpu:0")`, `backend.devices()`, and `backend.meta([d0, d1], {
 * tensorSplit })`, a virtual device that cuts every tensor across its devices (tensor
 * parallelism); `backend.fromSpec("cpu:0+cpu:1")` reads the command line's spelling;
 * `await backend.addRpcServer("host:port", { token })` adds a server's devices as rpc:N.
 */
export const backend = { device, devices, meta: metaDevice, fromSpec: deviceFromSpec, addRpcServer, closeRpcServers } as const;
