// Encode throughput of the reference (HF tokenizers via @anush008/tokenizers)
// on the same corpus as bench_tokenizer.cc, one thread, no special tokens.
// Usage: node bench.js TOKENIZER_JSON CORPUS_JSONL [SECONDS]
// Prints lines "reference <mode>: <MB/s> MB/s" (MB = 1e6 bytes of UTF-8).
'use strict';
// One thread for encodeBatch (rayon); must be set before the first call.
process.env.TOKENIZERS_PARALLELISM = 'false';
process.env.RAYON_NUM_THREADS = '1';
const fs = require('fs');

let Tokenizer;
try {
  ({Tokenizer} = require('@anush008/tokenizers'));
} catch (e) {
  process.stderr.write(`bench.js: run \`npm ci\` in ${__dirname} first\n`);
  process.exit(1);
}

async function main() {
  const [tokPath, corpusPath, secondsArg] = process.argv.slice(2);
  const seconds = Number(secondsArg || 3);
  const tok = Tokenizer.fromFile(tokPath);
  const texts = fs.readFileSync(corpusPath, 'utf8').split('\n')
      .filter((l) => l.length > 0).map((l) => JSON.parse(l).text);
  const bytes = texts.reduce((n, t) => n + Buffer.byteLength(t, 'utf8'), 0);
  const opts = {addSpecialTokens: false};

  const measure = async (name, pass) => {
    await pass();  // warm-up (and the BPE cache, as in a long-running server)
    let n = 0;
    const t0 = process.hrtime.bigint();
    let elapsed = 0;
    while (elapsed < seconds) {
      await pass();
      ++n;
      elapsed = Number(process.hrtime.bigint() - t0) / 1e9;
    }
    const mbs = (bytes * n) / elapsed / 1e6;
    console.log(`reference ${name}: ${mbs.toFixed(2)} MB/s ` +
                `(${n} passes over ${texts.length} strings, ${bytes} bytes)`);
  };
  await measure('encode (one string per call)', async () => {
    for (const t of texts) await tok.encode(t, null, opts);
  });
  await measure('encodeBatch (whole corpus, 1 thread)', async () => {
    await tok.encodeBatch(texts, opts);
  });
}
main().catch((e) => { console.error(e); process.exit(1); });
