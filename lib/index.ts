/** weft's public API. */
export { WeftError, type WeftErrorCode } from "./core/errors.js";
export { GgmlType, TYPES, rowSize, typeByName, type TypeTraits } from "./core/types.js";
export { Op, OPS, UnaryOp, GluOp, RopeMode, type OpName } from "./core/ops.js";
export { Tensor, TensorFlag, type Shape4 } from "./core/tensor.js";
export * as ops from "./core/graph.js";
export { Graph, buildGraph, newTensor } from "./core/graph.js";
export { CpuBuffer, allocateTensors, setTensorData, getTensorData } from "./cpu/buffer.js";
export { CpuBackend, type CpuBackendOptions } from "./cpu/backend.js";
export { readGguf } from "./gguf/reader.js";
export { writeGguf, type GgufTensorSpec } from "./gguf/writer.js";
export { GgufValueType, type GgufFile, type GgufTensorInfo, type GgufValue } from "./gguf/types.js";
export { quantizeModel, planQuantTypes, QUANT_SCHEMES } from "./quant/quantize.js";
