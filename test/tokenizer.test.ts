import { test } from "uvu";
import * as assert from "uvu/assert";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadTokenizer } from "../lib/model/model.js";
import { fixture, haveFixtures, warnNoFixtures } from "./helpers.js";
import { writeTinyModel } from "./tiny-model.js";

interface Case { text: string; ids: number[]; ids_no_bos: number[]; ids_parse_special: number[]; pieces_hex: string[]; detok: string; detok_from_ids: string }

for (const [golden, vocab] of [["tokenizer-spm.golden.json", "stories260K.gguf"], ["tokenizer-bpe.golden.json", "llama3-bpe-vocab.gguf"]] as const) {
  test(`${golden}: ids (with/without BOS, parse_special), pieces, detokenization identical to llama.cpp`, () => {
    if (!haveFixtures) return warnNoFixtures(golden);
    const g = JSON.parse(readFileSync(fixture(golden), "utf8")) as { cases: Case[]; bos_id: number; eos_id: number };
    const tok = loadTokenizer(fixture(vocab));
    assert.is(tok.bos, g.bos_id);
    assert.is(tok.eos, g.eos_id);
    for (const c of g.cases) {
      const at = JSON.stringify(c.text);
      assert.equal(tok.tokenize(c.text), c.ids, `ids of ${at}`);
      assert.equal(tok.tokenize(c.text, { addSpecial: false }), c.ids_no_bos, `ids_no_bos of ${at}`);
      assert.equal(tok.tokenize(c.text, { parseSpecial: true }), c.ids_parse_special, `ids_parse_special of ${at}`);
      assert.equal(c.ids_no_bos.map((id) => Buffer.from(tok.tokenToPiece(id)).toString("hex")), c.pieces_hex, `pieces of ${at}`);
      assert.is(tok.detokenize(c.ids_no_bos), c.detok, `detok of ${at}`);
      assert.is(tok.detokenize(c.ids, { removeSpecial: true }), c.detok_from_ids, `detok_from_ids of ${at}`);
    }
  });
}

test("streaming detokenization holds split UTF-8 characters until complete", () => {
  if (!haveFixtures) return warnNoFixtures("streaming detokenization");
  const tok = loadTokenizer(fixture("stories260K.gguf"));
  const text = "emoji 😀 and 日本";  // absent from the 512-token vocab: one byte token per UTF-8 byte
  const ids = tok.tokenize(text, { addSpecial: false });
  const dec = new TextDecoder();
  const pieces = ids.map((id) => dec.decode(tok.tokenToPiece(id), { stream: true }));
  assert.ok(pieces.some((p) => p === ""), "some tokens complete no character");
  assert.ok(!pieces.join("").includes("\uFFFD"), "no replacement characters");
  assert.is((pieces.join("") + dec.decode()).slice(1), text);  // the SPM space prefix comes back as a leading space
});

test("adversarial inputs: long runs tokenize in linear-ish time and round-trip", async () => {
  const dir = mkdtempSync(join(tmpdir(), "weft-tok-"));
  try {
    const p = join(dir, "tiny.gguf");
    await writeTinyModel(p, { nLayer: 1 });
    const tok = loadTokenizer(p);
    for (const s of [" ".repeat(20000), "the ".repeat(5000), "\u{1F600}".repeat(3000), "\0\x01\x7f"]) {
      const t0 = performance.now();
      const ids = tok.tokenize(s, { addSpecial: false });
      assert.ok(performance.now() - t0 < 5000, "tokenizing took too long");
      assert.is(tok.detokenize(ids), s);
    }
    assert.throws(() => tok.tokenToPiece(-1), /outside the vocabulary/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
