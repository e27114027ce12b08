#!/usr/bin/env node
// Independent client of sae-server: @grpc/grpc-js + @grpc/proto-loader, with
// proto/sae/v1/sae.proto loaded at run time (the proto is the contract; no
// generated code, nothing from the C++ tree). Calls Extract, ExtractStream,
// Tokenize, Info, ListSaes, grpc.health.v1 Check and server reflection, checks
// every answer, and exits non-zero on the first mismatch or after 30 s.
//
//   node sae_interop.js 127.0.0.1:PORT [CA.pem CLIENT.pem CLIENT.key]
//
// With the three PEM files it connects over TLS, trusting CA.pem and
// presenting the client certificate (a server with tls_client_ca_file).
'use strict';

const fs = require('fs');
const path = require('path');
const assert = require('assert/strict');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..');
const LOADER_OPTIONS = {keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true};
const TEXT = 'The cat sat on the red mat.';

function load(file, includeDir) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(file, {...LOADER_OPTIONS, includeDirs: [includeDir]}));
}

const sae = load('sae/v1/sae.proto', path.join(REPO, 'proto')).sae.v1;
const health = load('grpc/health/v1/health.proto', path.join(REPO, 'client')).grpc.health.v1;
const reflection =
    load('grpc/reflection/v1alpha/reflection.proto', path.join(REPO, 'tests', 'e2e')).grpc.reflection.v1alpha;

function deadline(seconds = 10) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, {deadline: deadline()}, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// Server streaming: every response, or the error with the responses so far.
function serverStream(client, method, request) {
  return new Promise((resolve, reject) => {
    const responses = [];
    const call = client[method](request, {deadline: deadline()});
    call.on('data', (r) => responses.push(r));
    call.on('error', (err) => {
      err.responses = responses;
      reject(err);
    });
    call.on('end', () => resolve(responses));
  });
}

// Bidi streaming: writes every request at once (before reading anything),
// then half-closes; resolves with the responses in arrival order.
function bidi(client, method, requests) {
  return new Promise((resolve, reject) => {
    const responses = [];
    const call = client[method]({deadline: deadline()});
    call.on('data', (r) => responses.push(r));
    call.on('error', reject);
    call.on('end', () => resolve(responses));
    for (const r of requests) call.write(r);
    call.end();
  });
}

// Code points of `s` in [start, end): offsets are in code points, not UTF-16 units.
function codePointSlice(s, start, end) {
  return Array.from(s).slice(start, end).join('');
}

function checkTokenize(tokens, info) {
  assert.ok(tokens.length >= 3, `Tokenize: ${tokens.length} tokens`);
  assert.equal(tokens[0].id, info.bos_token_id, 'Tokenize: BOS first');
  for (const t of tokens.slice(1)) {
    const span = codePointSlice(TEXT, t.char_start, t.char_end);
    assert.equal(span, t.piece, `Tokenize: span of ${JSON.stringify(t.piece)}`);
  }
  const pieces = tokens.map((t) => t.piece);
  assert.ok(pieces.includes(' cat'), `Tokenize: pieces ${JSON.stringify(pieces)}`);
  assert.equal(tokens[tokens.length - 1].char_end, Array.from(TEXT).length, 'Tokenize: last span ends the text');
}

// The streamed chunks of one request: sizes, positions, flags, sort order.
function checkChunks(label, chunks, {requestId, chunkTokens, k, saes, ids}) {
  assert.ok(chunks.length > 0, `${label}: no response`);
  const tokens = [];
  chunks.forEach((c, i) => {
    assert.equal(c.request_id, requestId, `${label}: request_id`);
    assert.equal(c.done, i === chunks.length - 1, `${label}: done only on the last chunk`);
    assert.equal(c.error, null, `${label}: no error`);
    assert.equal(c.total_tokens, ids.length, `${label}: total_tokens`);
    assert.ok(c.tokens.length >= 1 && c.tokens.length <= chunkTokens, `${label}: chunk of ${c.tokens.length}`);
    tokens.push(...c.tokens);
  });
  assert.deepEqual(tokens.map((t) => t.position), ids.map((_, i) => i), `${label}: positions`);
  assert.deepEqual(tokens.map((t) => t.token_id), ids, `${label}: token ids`);
  let fired = 0;
  for (const t of tokens) {
    assert.deepEqual(t.saes.map((s) => s.sae), saes, `${label}: SAEs in request order`);
    for (const s of t.saes) {
      assert.equal(s.indices.length, s.values.length, `${label}: indices/values`);
      assert.ok(s.values.length <= k, `${label}: at most k features`);
      s.values.forEach((v, i) => {
        assert.ok(v > 0, `${label}: only active features`);
        if (i > 0) assert.ok(s.values[i - 1] >= v, `${label}: values descending`);
      });
      fired += s.values.length;
    }
  }
  assert.ok(fired > 0, `${label}: some feature fired`);
  return tokens;
}

// Two results for the same tokens computed in different batches: BLAS sums
// in another order, so values agree to float rounding, not bit for bit. A
// feature may be in one list only when it ties the other list's smallest
// value (a near-tie at the top-k cut).
function assertSameFeatures(got, want, label) {
  assert.equal(got.length, want.length, `${label}: token count`);
  const close = (a, b) => Math.abs(a - b) <= 1e-5 + 1e-4 * Math.abs(b);
  got.forEach((g, t) => {
    const w = want[t];
    assert.equal(g.token_id, w.token_id, `${label}: token ${t}`);
    assert.equal(g.piece, w.piece, `${label}: piece ${t}`);
    assert.deepEqual([g.char_start, g.char_end], [w.char_start, w.char_end], `${label}: span ${t}`);
    assert.deepEqual(g.saes.map((s) => s.sae), w.saes.map((s) => s.sae), `${label}: SAEs ${t}`);
    g.saes.forEach((gs, j) => {
      const ws = w.saes[j];
      const gm = new Map(gs.indices.map((idx, i) => [idx, gs.values[i]]));
      const wm = new Map(ws.indices.map((idx, i) => [idx, ws.values[i]]));
      for (const [a, b] of [[gm, wm], [wm, gm]]) {
        const bValues = [...b.values()];
        const bMin = bValues.length ? Math.min(...bValues) : 0;
        for (const [idx, v] of a) {
          const where = `${label}: token ${t} ${gs.sae} feature ${idx}`;
          if (b.has(idx)) assert.ok(close(v, b.get(idx)), `${where}: ${v} vs ${b.get(idx)}`);
          else assert.ok(close(v, bMin), `${where} only on one side (${v})`);
        }
      }
    });
  });
}

async function main() {
  const address = process.argv[2];
  const tlsFiles = process.argv.slice(3);
  if (!address || (tlsFiles.length !== 0 && tlsFiles.length !== 3)) {
    throw new Error('usage: node sae_interop.js HOST:PORT [CA.pem CLIENT.pem CLIENT.key]');
  }
  const credentials = tlsFiles.length === 0 ?
      grpc.credentials.createInsecure() :
      grpc.credentials.createSsl(fs.readFileSync(tlsFiles[0]), fs.readFileSync(tlsFiles[2]), fs.readFileSync(tlsFiles[1]));
  const service = new sae.SaeService(address, credentials);
  const healthClient = new health.Health(address, credentials);
  const reflectionClient = new reflection.ServerReflection(address, credentials);

  // The server listens before the model is loaded: wait for SERVING.
  const start = Date.now();
  for (;;) {
    try {
      const r = await unary(healthClient, 'Check', {service: ''});
      if (r.status === 'SERVING') break;
    } catch (err) {
      if (Date.now() - start > 20000) throw err;
    }
    if (Date.now() - start > 20000) throw new Error('not SERVING after 20 s');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const serviceHealth = await unary(healthClient, 'Check', {service: 'sae.v1.SaeService'});
  assert.equal(serviceHealth.status, 'SERVING', 'health of sae.v1.SaeService');
  await assert.rejects(unary(healthClient, 'Check', {service: 'no.such.Service'}),
      (err) => err.code === grpc.status.NOT_FOUND, 'health of an unknown service is NOT_FOUND');
  console.log('ok  health Check');

  const info = await unary(service, 'Info', {});
  assert.ok(info.d_model > 0 && info.vocab_size > 0 && info.max_k > 0, `Info: ${JSON.stringify(info)}`);
  const saeNames = (await unary(service, 'ListSaes', {})).saes.map((s) => s.name);
  assert.ok(saeNames.length >= 2, `ListSaes: ${saeNames}`);
  console.log(`ok  Info, ListSaes (${saeNames.join(', ')})`);

  const tokens = (await unary(service, 'Tokenize', {text: TEXT})).tokens;
  checkTokenize(tokens, info);
  const noBos = (await unary(service, 'Tokenize', {text: TEXT, add_bos: false})).tokens;
  assert.deepEqual(noBos.map((t) => t.id), tokens.slice(1).map((t) => t.id), 'Tokenize: add_bos=false drops BOS');
  console.log(`ok  Tokenize (${tokens.length} tokens)`);

  const ids = tokens.map((t) => t.id);
  const saes = saeNames.slice(0, 2).reverse();  // request order, not server order
  const request = {request_id: 'x1', text: TEXT, saes, k: 3, chunk_tokens: 2};
  const chunks = await serverStream(service, 'Extract', request);
  const extracted = checkChunks('Extract', chunks, {requestId: 'x1', chunkTokens: 2, k: 3, saes, ids});
  assert.equal(extracted[0].saes.every((s) => s.values.length === 0), true, 'Extract: BOS carries no features');
  extracted.slice(1).forEach((t, i) => assert.equal(t.piece, tokens[i + 1].piece, 'Extract: pieces match Tokenize'));
  const byIds = await serverStream(service, 'Extract', {token_ids: {ids}, saes, k: 3, chunk_tokens: 4});
  const byIdsTokens = checkChunks('Extract(token_ids)', byIds, {requestId: '', chunkTokens: 4, k: 3, saes, ids});
  // The same tokens give the same features whether sent as text or as ids.
  assert.deepEqual(byIdsTokens.map((t) => t.saes), extracted.map((t) => t.saes), 'Extract: text == token_ids');
  await assert.rejects(serverStream(service, 'Extract', {text: 'hi', saes: ['no-such-sae']}),
      (err) => err.code === grpc.status.INVALID_ARGUMENT && /no-such-sae/.test(err.details), 'Extract: unknown SAE');
  console.log(`ok  Extract (${chunks.length} chunks)`);

  // Several requests on one stream, all written before any response is read;
  // one of them fails and the stream carries on.
  const texts = {a: TEXT, b: 'A blue bird flew over the green tree.', c: 'red cat'};
  const streamRequests =
      Object.entries(texts).map(([id, text]) => ({request_id: id, text, saes, k: 3, chunk_tokens: 1}));
  streamRequests.splice(1, 0, {request_id: 'bad', text: 'hi', saes: ['no-such-sae']});
  const responses = await bidi(service, 'ExtractStream', streamRequests);
  const byRequest = {};
  for (const r of responses) (byRequest[r.request_id] = byRequest[r.request_id] || []).push(r);
  assert.deepEqual(Object.keys(byRequest).sort(), ['a', 'b', 'bad', 'c'], 'ExtractStream: request ids');
  assert.equal(byRequest.bad.length, 1, 'ExtractStream: one error response');
  assert.equal(byRequest.bad[0].done, true, 'ExtractStream: error response is done');
  assert.equal(byRequest.bad[0].error.code, grpc.status.INVALID_ARGUMENT, 'ExtractStream: error code');
  for (const [id, text] of Object.entries(texts)) {
    const want = (await unary(service, 'Tokenize', {text})).tokens.map((t) => t.id);
    const expected = {requestId: id, chunkTokens: 1, k: 3, saes, ids: want};
    const got = checkChunks(`ExtractStream[${id}]`, byRequest[id], expected);
    if (id === 'a') assertSameFeatures(got, extracted, 'ExtractStream vs Extract');
  }
  console.log(`ok  ExtractStream (${responses.length} responses, 4 requests)`);

  const reflectionResponses = await bidi(reflectionClient, 'ServerReflectionInfo',
      [{list_services: '*'}, {file_containing_symbol: 'sae.v1.SaeService'}]);
  assert.equal(reflectionResponses.length, 2, 'reflection: two answers');
  const services = reflectionResponses[0].list_services_response.service.map((s) => s.name);
  for (const name of ['sae.v1.SaeService', 'grpc.health.v1.Health']) {
    assert.ok(services.includes(name), `reflection lists ${name}: ${services}`);
  }
  const files = reflectionResponses[1].file_descriptor_response.file_descriptor_proto;
  assert.ok(files.length > 0, 'reflection: file descriptor for sae.v1.SaeService');
  const descriptor = Buffer.concat(files).toString('latin1');
  for (const name of ['sae.v1', 'SaeService', 'ExtractStream']) {
    assert.ok(descriptor.includes(name), `reflection: descriptor mentions ${name}`);
  }
  console.log(`ok  reflection (${services.join(', ')})`);

  for (const c of [service, healthClient, reflectionClient]) c.close();
}

const watchdog = setTimeout(() => {
  console.error('FAIL: timed out after 30 s');
  process.exit(1);
}, 30000);
main().then(() => {
  clearTimeout(watchdog);
  console.log('PASS');
}, (err) => {
  console.error(`FAIL: ${err.message}`);
  if (err.stack) console.error(err.stack);
  process.exit(1);
});
