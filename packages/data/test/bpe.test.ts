import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { BpeTokenizer, ByteTokenizer, EOT_TOKEN } from "../src/index.ts";
import { tempDir } from "./helpers.ts";

const dir = tempDir();
const corpus = [
  "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
  "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
  "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
].flatMap((t) => [t, t.toUpperCase(), t.replaceAll(" ", "  ")]);
const tricky = `Héllo wörld — “quotes” 日本語 🙂 tabs\tand\n\nnewlines  ${EOT_TOKEN} it's 2024!`;

describe("BpeTokenizer", () => {
  it("learns merges up to the requested vocabulary and round-trips any text", async () => {
    const tok = await BpeTokenizer.train(corpus, 300);
    expect(tok.vocabSize).toBe(300);
    expect(tok.merges.length).toBe(300 - 257);
    expect(tok.eotId).toBe(0);
    expect(tok.merges[0]).toEqual(["Ġ", "t"]); // " t" is the most frequent pair of this corpus
    for (const text of [...corpus, tricky, ""]) expect(tok.decode(tok.encode(text))).toBe(text);
    const the = tok.encode(" the");
    expect(the.length).toBe(1); // a frequent word becomes one token
    expect(tok.encode(tricky).filter((id) => id === tok.eotId).length).toBe(1);
    expect(tok.encode(corpus[0]).length).toBeLessThan(0.75 * new ByteTokenizer().encode(corpus[0]).length);
  });

  it("trains deterministically", async () => {
    const a = await BpeTokenizer.train(corpus, 320);
    const b = await BpeTokenizer.train(corpus, 320);
    expect(a.merges).toEqual(b.merges);
  });

  it("stops early when no pair repeats, rather than learning noise", async () => {
    const tok = await BpeTokenizer.train(["abc"], 1000);
    expect(tok.vocabSize).toBe(257);
  });

  it("saves and loads a Hugging Face tokenizer.json", async () => {
    const tok = await BpeTokenizer.train(corpus, 300);
    const path = join(dir, "tokenizer.json");
    await tok.save(path);
    const json = JSON.parse(readFileSync(path, "utf8"));
    expect(json.model.type).toBe("BPE");
    expect(json.pre_tokenizer.type).toBe("ByteLevel");
    expect(json.decoder.type).toBe("ByteLevel");
    expect(Object.keys(json.model.vocab).length).toBe(300);
    expect(json.model.merges[0]).toBe("Ġ t");
    expect(json.added_tokens[0]).toMatchObject({ id: 0, content: EOT_TOKEN, special: true });
    const back = await BpeTokenizer.load(path);
    expect(Array.from(back.encode(tricky))).toEqual(Array.from(tok.encode(tricky)));
    // The newer merges format, pairs instead of "a b" strings, loads too.
    json.model.merges = json.model.merges.map((m: string) => m.split(" "));
    expect(Array.from(BpeTokenizer.fromJSON(json).encode(tricky))).toEqual(Array.from(tok.encode(tricky)));
  });

  it("byte tokenizer: UTF-8 bytes", () => {
    const tok = new ByteTokenizer();
    expect(Array.from(tok.encode("é!"))).toEqual([0xc3, 0xa9, 0x21]);
    expect(tok.decode(tok.encode(tricky))).toBe(tricky);
  });
});
