/** `weft run`, `weft tokenize`, `weft logits`, `weft devices`, `weft synth`. */
import { WeftError, weftError } from "../core/errors.js";
import { loadTokenizer } from "../model/model.js";
import { DEFAULT_MODEL } from "../model/default.js";
import { SYNTH_PRESETS, SYNTH_TYPES, synthModel } from "../model/synth.js";
import { devices as listDevices } from "../backend/registry.js";
import { int, num, parse } from "./args.js";
import { Command, MODEL_FLAGS, MODEL_FLAGS_HELP, RPC_FLAGS, RPC_FLAGS_HELP, connectRpc, log, openModel, printProfile, resolveModel, stdoutWriter } from "./common.js";

const STOPPED: Record<string, (n: number, limit: number, ctx: number) => string> = {
  maxTokens: (n) => `(stopped after ${n} tokens: -n)`,
  contextFull: (_n, _l, ctx) => `(stopped: the context of ${ctx} tokens is full; -c sets a larger one)`,
  aborted: (n) => (n ? "(interrupted)" : "(interrupted during the prompt)"),
};

export const RUN_COMMANDS: Record<string, Command> = {
  run: {
    summary: "generate text from a prompt (streams to stdout; everything else goes to stderr)",
    usage: `weft run [-m MODEL] -p TEXT [options]

${MODEL_FLAGS_HELP}
  -p, --prompt TEXT        the prompt (default "Once upon a time")
  -n, --n-predict N        most tokens to generate (default 128; -1: until the end token or a
                           full context)
  --temp T                 temperature; 0 = greedy (default 0.8)
  --top-k K                keep the K most likely tokens; 0 = all (default 40)
  --top-p P                nucleus sampling threshold; 1 = off (default 0.95)
  --min-p P                drop tokens below P × the top probability; 0 = off (default 0.05)
  --repeat-penalty R       penalize the last 64 tokens; 1 = off (default 1)
  -s, --seed S             RNG seed (default or -1: random)
  --special                special-token text in the prompt (<|start_header_id|>, <s>) becomes
                           its token instead of plain text
  --echo                   print the prompt before the generation
With --rpc, a server that dies or a link that drops during generation is reconnected once
(for up to 30 s) and the generation continues where it stopped. Generation stops at an
end-of-generation token, after -n tokens, or when the context is full; the reason goes to stderr unless it was the end token. Ctrl-C stops within one
micro-batch, prints what was generated and exits with 130. Timings go to stderr, so
"weft run ... > out.txt" captures exactly the generated text (a final newline is added only
on a terminal).`,
    async run(args, signal) {
      const { values: v } = parse(args, {
        ...MODEL_FLAGS,
        prompt: { names: ["-p", "--prompt"] }, nPredict: { names: ["-n", "--n-predict"] },
        temp: { names: ["--temp"] }, topK: { names: ["--top-k"] }, topP: { names: ["--top-p"] }, minP: { names: ["--min-p"] },
        repeatPenalty: { names: ["--repeat-penalty"] }, seed: { names: ["-s", "--seed"] }, echo: { names: ["--echo"], switch: true },
        special: { names: ["--special"], switch: true },
      });
      const prompt = v.prompt ?? "Once upon a time";
      const n = int(v.nPredict, "--n-predict", 128, -1);
      const seed = int(v.seed, "--seed", -1, -1);
      const sampling = {
        temperature: num(v.temp, "--temp", 0.8), topK: int(v.topK, "--top-k", 40), topP: num(v.topP, "--top-p", 0.95),
        minP: num(v.minP, "--min-p", 0.05), repeatPenalty: num(v.repeatPenalty, "--repeat-penalty", 1),
        seed: seed < 0 ? undefined : seed,
      };
      const ac = new AbortController();
      const stop = () => ac.abort(weftError("ABORTED", "stdout closed"));
      signal.addEventListener("abort", () => ac.abort(signal.reason), { once: true });
      const write = stdoutWriter(stop);
      let pipeClosed = false;
      const m = await openModel(v, ac.signal);
      try {
        const ids = m.tokenize(prompt, { parseSpecial: v.special ?? false });
        if (v.echo) write(prompt);
        let count = 0, tFirst = 0;
        const t0 = performance.now();
        let gen = m.generate(ids, { ...sampling, maxTokens: n, signal: ac.signal });
        let retried = false;
        for (;;) {
          try {
            for await (const p of gen) {
              if (count === 0) tFirst = performance.now();
              if (p.token >= 0) count++;
              write(p.text);
            }
            break;
          } catch (e) {
            // a remote device's server died or its link dropped: connect again once and go on
            if (!retried && e instanceof WeftError && e.code === "RPC_CLOSED" && !ac.signal.aborted) {
              retried = true;
              log(`\nweft: ${e.message}; reconnecting (once, for up to 30 s)…`);
              await m.reconnect({ signal: ac.signal, timeoutMs: 30_000 });
              log("weft: reconnected; the sequence so far was evaluated again, generation continues");
              gen = m.resume({ ...sampling, maxTokens: n < 0 ? -1 : n - count, signal: ac.signal });
              continue;
            }
            if (!ac.signal.aborted) throw e;
            pipeClosed = !signal.aborted;
            break;
          }
        }
        const t1 = performance.now();
        if (process.stdout.isTTY) write("\n");
        const why = gen.stopReason && gen.stopReason !== "eog" && !pipeClosed ? STOPPED[gen.stopReason]?.(count, n, m.contextSize) : undefined;
        if (why) log(why);
        const ppMs = (tFirst || t1) - t0;
        if (tFirst || !ac.signal.aborted) log(`prompt: ${ids.length} tokens in ${ppMs.toFixed(0)} ms (${(ids.length / (ppMs / 1000)).toFixed(1)} t/s)`);
        if (count > 1) log(`generation: ${count} tokens in ${(t1 - tFirst).toFixed(0)} ms (${((count - 1) / ((t1 - tFirst) / 1000)).toFixed(1)} t/s)`);
        printProfile("prompt + generation");
        return 0;
      } finally {
        await m.dispose();
      }
    },
  },
  tokenize: {
    summary: "print a text's token ids as a JSON array",
    usage: `weft tokenize -m MODEL -p TEXT [--no-bos] [--parse-special] [--pieces]

  -m, --model FILE   GGUF model or vocab-only GGUF (required)
  -p, --prompt TEXT  text to tokenize
  --no-bos           do not add BOS/EOS (llama_tokenize with add_special = false)
  --parse-special    turn special-token text such as <s> into its token
  --pieces           print [id, "piece"] pairs instead of ids`,
    async run(args) {
      const { values: v } = parse(args, {
        model: { names: ["-m", "--model"] }, prompt: { names: ["-p", "--prompt"] },
        noBos: { names: ["--no-bos"], switch: true }, parseSpecial: { names: ["--parse-special"], switch: true }, pieces: { names: ["--pieces"], switch: true },
      });
      if (v.model === undefined) throw weftError("USAGE", "-m MODEL is required (a model or a vocab-only GGUF)");
      if (v.prompt === undefined) throw weftError("USAGE", "-p TEXT is required");
      const tok = loadTokenizer(await resolveModel(v.model));
      const ids = tok.tokenize(v.prompt, { addSpecial: !v.noBos, parseSpecial: v.parseSpecial ?? false });
      const dec = new TextDecoder();
      console.log(JSON.stringify(v.pieces ? ids.map((id) => [id, dec.decode(tok.tokenToPiece(id, true))]) : ids));
      return 0;
    },
  },
  logits: {
    summary: "print the logits of every position of a prompt as JSON {tokens, logits}",
    usage: `weft logits [-m MODEL] (-p TEXT | --tokens 1,2,3) [options]

${MODEL_FLAGS_HELP}
  -p, --prompt TEXT        tokenized with BOS as the vocabulary asks
  --tokens LIST            comma-separated token ids instead of a prompt
The whole sequence is evaluated as one batch (unless -ub is smaller); logits[i] is the
distribution of the token after tokens[0..i].`,
    async run(args, signal) {
      const { values: v } = parse(args, { ...MODEL_FLAGS, prompt: { names: ["-p", "--prompt"] }, tokens: { names: ["--tokens"] } });
      if ((v.prompt === undefined) === (v.tokens === undefined)) throw weftError("USAGE", "give exactly one of -p TEXT or --tokens LIST");
      const tokens = v.tokens?.split(",").map((s) => int(s.trim(), "--tokens", 0));
      const m = await openModel({ ...v, ubatch: v.ubatch ?? String(1 << 30), batch: v.batch ?? String(1 << 30) }, signal);
      try {
        const ids = tokens ?? m.tokenize(v.prompt!);
        const lg = await m.evaluate(ids, { allLogits: true, signal });
        const V = m.hparams.nVocab;
        const rows = ids.map((_, i) => Array.from(lg.subarray(i * V, (i + 1) * V)));
        stdoutWriter(() => {})(JSON.stringify({ tokens: ids, logits: rows }) + "\n");
        return 0;
      } finally {
        await m.dispose();
      }
    },
  },
  devices: {
    summary: "list the devices weft can use, with memory and capabilities",
    usage: `weft devices [--rpc LIST] [--token-file FILE]

${RPC_FLAGS_HELP}
CPU devices cpu:0 … cpu:63 are separate queues with their own thread pools in this process
(--device cpu:0,cpu:1 -t 1 gives each one thread), so multi-device runs work on one machine.
A + group (cpu:0+cpu:1) is one tensor-parallel (meta) device over its members. With --rpc,
the devices of those weft rpc-servers are listed as rpc:0, rpc:1, … with their memory.
CUDA devices are not available in this build.`,
    async run(args, signal) {
      const { values: v } = parse(args, RPC_FLAGS);
      await connectRpc(v, signal);
      for (const d of listDevices()) {
        const mem = d.memory();
        console.log(`${d.name.padEnd(8)} ${d.type.padEnd(4)} ${d.description}; memory ${(mem.free / 2 ** 30).toFixed(1)} / ${(mem.total / 2 ** 30).toFixed(1)} GiB free; ` +
          `async ${d.caps.async ? "yes" : "no"}, events ${d.caps.events ? "yes" : "no"}, collectives ${d.caps.collectives ? "yes" : "no"}`);
      }
      console.log("cpu:N    more CPU devices on the same cores (cpu:1 … cpu:63): each its own queue and threads");
      console.log("a+b      a tensor-parallel device over a and b (--split-mode tensor makes one over all --device)");
      if (!v.rpc) console.log("rpc:N    devices of weft rpc-servers: weft devices --rpc host:port lists them");
      console.log("(no CUDA devices in this build)");
      return 0;
    },
  },
  synth: {
    summary: "write a deterministic random-weight model of a benchmark preset",
    usage: `weft synth --preset PRESET --type TYPE [--seed S] -o FILE

  --preset NAME   ${Object.entries(SYNTH_PRESETS).map(([k, p]) => `${k} (n_embd ${p.nEmbd}, ${p.nLayer} layers, ${p.vocab})`).join(", ")}
  --type TYPE     ${Object.keys(SYNTH_TYPES).join(", ")}
                  (q4_0: Q4_0 with the output matrix in Q6_K; q4_k_m: llama.cpp's Q4_K_M mix)
  --seed S        weights seed (default 42)
  -o, --out FILE  output GGUF (written to a temporary beside it, renamed when complete)
Shapes follow ../shared/BASELINES.md. Vocabularies: Llama 2's 32000-token SentencePiece
vocabulary (tiny, small) and Llama 3's 128256-token BPE vocabulary (1b), from the npm
packages llama-tokenizer-js and llama3-tokenizer-js. The default model of "weft run" is
--preset ${DEFAULT_MODEL.preset} --type ${DEFAULT_MODEL.type} --seed ${DEFAULT_MODEL.seed}.`,
    async run(args, signal) {
      const { values: v } = parse(args, { preset: { names: ["--preset"] }, type: { names: ["--type"] }, seed: { names: ["--seed"] }, out: { names: ["-o", "--out"] } });
      if (!v.preset || !v.type || !v.out) throw weftError("USAGE", "--preset, --type and -o are required");
      const t0 = performance.now();
      const r = await synthModel({
        preset: v.preset, type: v.type, seed: int(v.seed, "--seed", 42), out: v.out, signal,
        onProgress: (d, n, name) => { if (process.stderr.isTTY) process.stderr.write(`\r[${d}/${n}] ${name.padEnd(32)}`); },
      });
      if (process.stderr.isTTY) process.stderr.write("\n");
      log(`wrote ${r.path}: ${(r.params / 1e6).toFixed(1)} M parameters in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
      return 0;
    },
  },
};
