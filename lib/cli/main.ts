/** `weft` command line. Each command: a help text and a run function. */
import { WeftError } from "../core/errors.js";
import { TYPES } from "../core/types.js";
import { readGguf } from "../gguf/reader.js";
import { GgufValue } from "../gguf/types.js";
import { QUANT_SCHEMES, quantizeModel } from "../quant/quantize.js";
import { KERNEL_LEVELS, native } from "../cpu/native.js";
import { Command, RUN_COMMANDS } from "./run.js";
import { BENCH_COMMAND } from "./bench.js";

function takeFlag(args: string[], name: string): boolean {
  const i = args.indexOf(name);
  if (i < 0) return false;
  args.splice(i, 1);
  return true;
}

function describeValue(v: GgufValue): string {
  if (v.type === 9) {
    const vals = v.value.values as ArrayLike<unknown>;
    const head = Array.from({ length: Math.min(4, vals.length) }, (_, i) => JSON.stringify(vals[i]));
    return `[${head.join(", ")}${vals.length > 4 ? `, … ${vals.length} items` : ""}]`;
  }
  return typeof v.value === "bigint" ? v.value.toString() : JSON.stringify(v.value);
}

const COMMANDS: Record<string, Command> = {
  ...RUN_COMMANDS,
  bench: BENCH_COMMAND,
  quantize: {
    summary: "re-quantize a GGUF model (like llama-quantize)",
    usage: `weft quantize IN.gguf OUT.gguf TYPE [--pure]

  TYPE     one of: ${Object.keys(QUANT_SCHEMES).join(", ")}
  --pure   every matrix gets TYPE; without it, q4_0 keeps the output matrix in Q6_K and
           q4_k_m uses llama.cpp's Q4_K_M mix (Q6_K for the output and some attn_v/ffn_down)
Norm vectors and other 1-D tensors are copied unchanged. Metadata is copied and
general.file_type is set.`,
    async run(args) {
      const pure = takeFlag(args, "--pure");
      if (args.length !== 3) { console.error(this.usage); return 2; }
      const [inp, out, type] = args as [string, string, string];
      const t0 = performance.now();
      const plan = await quantizeModel(inp, out, type, {
        pure,
        onProgress: (d, n, name) => process.stderr.write(`\r[${d}/${n}] ${name.padEnd(40)}`),
      });
      process.stderr.write("\n");
      const counts: Record<string, number> = {};
      for (const t of plan.values()) counts[TYPES[t].name] = (counts[TYPES[t].name] ?? 0) + 1;
      console.error(`wrote ${out} in ${((performance.now() - t0) / 1000).toFixed(2)} s: ${Object.entries(counts).map(([k, v]) => `${v}× ${k}`).join(", ")}`);
      return 0;
    },
  },
  info: {
    summary: "print a GGUF file's metadata and tensors",
    usage: `weft info MODEL.gguf [--tensors]

  --tensors   also list every tensor (name, type, shape)`,
    async run(args) {
      const withTensors = takeFlag(args, "--tensors");
      if (args.length !== 1) { console.error(this.usage); return 2; }
      const f = readGguf(args[0]!);
      console.log(`${f.path}: GGUF v${f.version}, ${f.fileSize} bytes, ${f.metadata.size} metadata keys, ${f.tensors.length} tensors, alignment ${f.alignment}`);
      for (const [k, v] of f.metadata) console.log(`  ${k} = ${describeValue(v)}`);
      if (withTensors) for (const t of f.tensors) console.log(`  ${t.name.padEnd(32)} ${TYPES[t.type as keyof typeof TYPES].name.padEnd(5)} [${t.ne.join(", ")}]`);
      return 0;
    },
  },
  cpu: {
    summary: "show the CPU kernel level in use and measured read bandwidth",
    usage: `weft cpu [--bandwidth]

  --bandwidth   also measure memory read bandwidth with 1 and 2 threads
The kernel level can be forced lower with WEFT_CPU_KERNELS=${KERNEL_LEVELS.join("|")}.`,
    async run(args) {
      const bw = takeFlag(args, "--bandwidth");
      const lvl = native().kernelLevel();
      console.log(`kernels: ${KERNEL_LEVELS[lvl.current]}${lvl.bf16 ? " with AVX512-BF16" : ""} (detected: ${KERNEL_LEVELS[lvl.detected]})`);
      if (bw) for (const t of [1, 2]) console.log(`read bandwidth, ${t} thread(s): ${native().readBandwidth(1 << 30, t, 5).toFixed(1)} GB/s`);
      return 0;
    },
  },
};

function help(): string {
  const w = Math.max(...Object.keys(COMMANDS).map((k) => k.length));
  return `weft — run GGUF models and tensor graphs across CPU, CUDA and RPC backends

usage: weft <command> [options]      (weft <command> --help for its flags)

commands:
${Object.entries(COMMANDS).map(([k, c]) => `  ${k.padEnd(w)}  ${c.summary}`).join("\n")}

environment:
  WEFT_CPU_KERNELS=${KERNEL_LEVELS.join("|")}   force a lower CPU kernel level (testing)
  WEFT_CACHE_DIR=DIR            where the embedded default model is synthesized (default ~/.cache/weft)
  WEFT_PEER_DIR=DIR             where "weft bench --peer node-llama-cpp" installs the peer
  WEFT_PROFILE=1                time every op in the native backend (see README)
`;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === "--help" || cmd === "-h" || cmd === "help") { console.log(help()); return cmd ? 0 : 2; }
  const c = COMMANDS[cmd];
  if (!c) { console.error(`weft: unknown command '${cmd}'\n\n${help()}`); return 2; }
  if (rest.includes("--help") || rest.includes("-h")) { console.log(c.usage); return 0; }
  try {
    return await c.run(rest);
  } catch (e) {
    if (e instanceof WeftError) { console.error(`weft ${cmd}: ${e.message} [${e.code}]`); return 1; }
    throw e;
  }
}
