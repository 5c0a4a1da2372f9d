/** `weft` command line. Each command: a help text and a run function. */
import { WeftError } from "../core/errors.js";
import { TYPES, isKnownType, typeName } from "../core/types.js";
import { readGguf } from "../gguf/reader.js";
import { GgufValue } from "../gguf/types.js";
import { QUANT_SCHEMES, quantizeModel } from "../quant/quantize.js";
import { KERNEL_LEVELS, native } from "../cpu/native.js";
import { usableCores } from "../cpu/index.js";
import { parse } from "./args.js";
import { Command, VERSION, log, onInterrupt } from "./common.js";
import { RUN_COMMANDS } from "./run.js";
import { BENCH_COMMAND } from "./bench.js";
import { RPC_SERVER_COMMAND } from "./rpc.js";
import { closeRpcServers } from "../rpc/index.js";

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
  "rpc-server": RPC_SERVER_COMMAND,
  quantize: {
    summary: "re-quantize a GGUF model (like llama-quantize)",
    usage: `weft quantize IN.gguf OUT.gguf TYPE [--pure] [--allow-requantize]

  TYPE                 one of: ${Object.keys(QUANT_SCHEMES).join(", ")}
  --pure               every matrix gets TYPE; without it, q4_0 keeps the output matrix in
                       Q6_K and q4_k_m uses llama.cpp's Q4_K_M mix (Q6_K for the output and
                       some attn_v/ffn_down)
  --allow-requantize   accept an input whose matrices are already quantized (quantizing
                       twice loses more than quantizing once from F32/F16/BF16)
Norm vectors and other 1-D tensors are copied unchanged. Metadata is copied and
general.file_type is set. OUT is written to a temporary beside it and renamed when
complete; it may not be IN (nor another name of the same file). Ctrl-C stops, leaving OUT
as it was.`,
    async run(args, signal) {
      const { values: v, positionals } = parse(args, { pure: { names: ["--pure"], switch: true }, requant: { names: ["--allow-requantize"], switch: true } }, [3, 3]);
      const [inp, out, type] = positionals as [string, string, string];
      const t0 = performance.now();
      const tty = process.stderr.isTTY;
      const plan = await quantizeModel(inp, out, type, {
        pure: v.pure, allowRequantize: v.requant, signal,
        onProgress: (d, n, name) => { if (tty) process.stderr.write(`\r[${d}/${n}] ${name.padEnd(40)}`); },
      });
      if (tty) process.stderr.write("\n");
      const counts: Record<string, number> = {};
      for (const t of plan.values()) counts[TYPES[t].name] = (counts[TYPES[t].name] ?? 0) + 1;
      log(`wrote ${out} in ${((performance.now() - t0) / 1000).toFixed(2)} s: ${Object.entries(counts).map(([k, n]) => `${n}× ${k}`).join(", ")}`);
      return 0;
    },
  },
  info: {
    summary: "print a GGUF file's metadata and tensors",
    usage: `weft info MODEL.gguf [--tensors]

  --tensors   also list every tensor (name, type, shape)
Any GGUF is listed, also one with tensor types weft cannot run (they are named).`,
    async run(args) {
      const { values: v, positionals } = parse(args, { tensors: { names: ["--tensors"], switch: true } }, [1, 1]);
      const f = readGguf(positionals[0]!);
      console.log(`${f.path}: GGUF v${f.version}, ${f.fileSize} bytes, ${f.metadata.size} metadata keys, ${f.tensors.length} tensors${f.tensors.length ? "" : " (vocabulary only)"}, alignment ${f.alignment}`);
      for (const [k, val] of f.metadata) console.log(`  ${k} = ${describeValue(val)}`);
      if (v.tensors) for (const t of f.tensors) console.log(`  ${t.name.padEnd(32)} ${typeName(t.type).padEnd(7)} [${t.ne.join(", ")}]`);
      const foreign = [...new Set(f.tensors.filter((t) => !isKnownType(t.type)).map((t) => typeName(t.type)))];
      if (foreign.length) console.log(`note: weft cannot run ${foreign.join(", ")} tensors (it runs ${Object.values(TYPES).filter((t) => t.weight).map((t) => t.name.toUpperCase()).join(", ")})`);
      return 0;
    },
  },
  cpu: {
    summary: "show the CPU kernel level in use and measured read bandwidth",
    usage: `weft cpu [--bandwidth]

  --bandwidth   also measure memory read bandwidth with 1 and 2 threads
The kernel level can be forced lower with WEFT_CPU_KERNELS=${KERNEL_LEVELS.join("|")}.`,
    async run(args) {
      const { values: v } = parse(args, { bandwidth: { names: ["--bandwidth"], switch: true } });
      const lvl = native().kernelLevel();
      console.log(`kernels: ${KERNEL_LEVELS[lvl.current]}${lvl.bf16 ? " with AVX512-BF16" : ""} (detected: ${KERNEL_LEVELS[lvl.detected]})`);
      console.log(`cores this process may use: ${usableCores()}`);
      if (v.bandwidth) for (const t of [1, 2]) console.log(`read bandwidth, ${t} thread(s): ${native().readBandwidth(1 << 30, t, 5).toFixed(1)} GB/s`);
      return 0;
    },
  },
};

function help(): string {
  const w = Math.max(...Object.keys(COMMANDS).map((k) => k.length));
  return `weft ${VERSION} — run GGUF models and tensor graphs on the CPU, on one device or split
across several by layer or by tensor (tensor parallelism)

usage: weft <command> [options]      (weft <command> --help for its flags; weft --version)

commands:
${Object.entries(COMMANDS).map(([k, c]) => `  ${k.padEnd(w)}  ${c.summary}`).join("\n")}

environment:
  WEFT_CPU_KERNELS=${KERNEL_LEVELS.join("|")}   force a lower CPU kernel level (testing)
  WEFT_CACHE_DIR=DIR            where the embedded default model is synthesized (default ~/.cache/weft)
  WEFT_PEER_DIR=DIR             where "weft bench --peer node-llama-cpp" installs the peer
  WEFT_PROFILE=1                time every op in the native backend (see README)
  WEFT_SPIN_US=N                how long a waiting thread spins before it sleeps (default 50)
  WEFT_DEBUG=1                  print the stack of an unexpected error
  WEFT_RPC_TOKEN=TOKEN          the shared token of weft rpc-server and --rpc (or --token-file)
Flags follow llama.cpp where it has them (-m, -p, -n, -t, -c, -b, -ub, -sm, -ts, -dev,
-ctk, -ctv, -s); llama.cpp flags with no meaning in weft yet (-ngl, -fa, --mlock) are
accepted with a note. Devices of other machines: weft rpc-server there, --rpc here.
CUDA devices are not available in this build.
`;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === "--version" || cmd === "-v") { console.log(`weft ${VERSION}`); return 0; }
  if (!cmd || cmd === "--help" || cmd === "-h" || cmd === "help") { console.log(help()); return cmd ? 0 : 2; }
  const c = COMMANDS[cmd];
  if (!c) { console.error(`weft: unknown command '${cmd}' (weft --help lists them)`); return 2; }
  if (rest.includes("--help") || rest.includes("-h")) { console.log(c.usage); return 0; }
  const ac = new AbortController();
  const interrupt = onInterrupt(ac);
  try {
    return interrupt.code(await c.run(rest, ac.signal));
  } catch (e) {
    if (ac.signal.aborted && e instanceof WeftError && e.code === "ABORTED") { log("(interrupted)"); return interrupt.code(1); }
    if (e instanceof WeftError) {
      console.error(`weft ${cmd}: ${e.message}`);
      return e.code === "USAGE" ? 2 : 1;
    }
    console.error(`weft ${cmd}: unexpected error: ${(e as Error)?.message ?? String(e)}${process.env.WEFT_DEBUG ? `\n${(e as Error)?.stack}` : " (WEFT_DEBUG=1 shows where)"}`);
    return 1;
  } finally {
    interrupt.dispose();
    closeRpcServers();  // the servers free what this run held there; the process can exit
  }
}
