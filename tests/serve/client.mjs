// The official OpenAI client (npm `openai`) driving `dsrt serve` over a tiny model: chat, streaming, tools
// in the request, completions, models, and the errors it maps to its own exception classes.
// Usage: node client.mjs DSRT_BINARY MODEL_DIR NPM_DIR (NPM_DIR/node_modules holds openai).
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import assert from 'node:assert/strict';
import path from 'node:path';
import { readFileSync } from 'node:fs';

const [dsrt, modelDir, npmDir] = process.argv.slice(2);
const require = createRequire(path.resolve(npmDir, 'package.json'));
const OpenAI = require('openai');
const { version } = JSON.parse(readFileSync(path.resolve(npmDir, 'node_modules/openai/package.json'), 'utf8'));

const key = 'sk-dsrt-node-test';
const srv = spawn(dsrt, ['serve', '--model', modelDir, '--port', '0', '--threads', '2', '--api-key', key,
                         '--model-name', 'tiny', '--ctx', '2048', '--quiet'], { stdio: ['ignore', 'inherit', 'pipe'] });
const exited = new Promise((resolve) => srv.on('exit', (code, signal) => resolve({ code, signal })));
const port = await new Promise((resolve, reject) => {
  let err = '';
  srv.stderr.on('data', (d) => {
    err += d;
    process.stderr.write(d);
    const m = /http:\/\/127\.0\.0\.1:(\d+)/.exec(err);
    if (m) resolve(Number(m[1]));
  });
  srv.on('exit', (code) => reject(new Error(`dsrt serve exited (${code}) before listening: ${err}`)));
  setTimeout(() => reject(new Error('dsrt serve did not start in 60 s')), 60000);
});

const client = new OpenAI({ apiKey: key, baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 0, timeout: 120000 });
const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'What is the weather like?' }];
let passed = 0, failed = 0;
async function test(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e && e.stack || e}`);
  }
}

let reference;
await test('chat.completions.create (non-stream)', async () => {
  const r = await client.chat.completions.create({ model: 'tiny', messages, max_tokens: 8, temperature: 0, ignore_eos: true });
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.model, 'tiny');
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.equal(typeof r.choices[0].message.content, 'string');
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 8);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + 8);
  reference = r.choices[0].message.content;
});

await test('chat.completions.create (stream, include_usage)', async () => {
  const stream = await client.chat.completions.create({ model: 'tiny', messages, max_tokens: 8, temperature: 0, ignore_eos: true,
                                                        stream: true, stream_options: { include_usage: true } });
  let text = '', usage = null, finish = null, chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices[0];
    if (!c) continue;
    if (c.delta.content) text += c.delta.content;
    if (c.finish_reason) finish = c.finish_reason;
  }
  assert.ok(chunks >= 3);
  assert.equal(text, reference);
  assert.equal(finish, 'length');
  assert.equal(usage.completion_tokens, 8);
});

await test('chat.completions.stream helper: finalChatCompletion', async () => {
  const runner = client.chat.completions.stream({ model: 'tiny', messages, max_tokens: 8, temperature: 0, ignore_eos: true });
  let deltas = '';
  runner.on('content', (delta) => { deltas += delta; });
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, reference);
  assert.equal(deltas, reference);
});

await test('logprobs / top_logprobs: non-stream, and the stream helper accumulating them', async () => {
  const req = { model: 'tiny', messages, max_tokens: 8, temperature: 0, ignore_eos: true, logprobs: true, top_logprobs: 2 };
  const r = await client.chat.completions.create(req);
  const content = r.choices[0].logprobs.content;
  assert.equal(content.length, 8);
  for (const e of content) {
    assert.equal(typeof e.token, 'string');
    assert.ok(e.logprob <= 0);
    assert.ok(Array.isArray(e.bytes));
    assert.equal(e.top_logprobs.length, 2);
    assert.equal(e.top_logprobs[0].token, e.token);  // greedy
  }
  const final = await client.chat.completions.stream(req).finalChatCompletion();
  const streamed = final.choices[0].logprobs.content;
  assert.equal(streamed.length, 8);
  assert.deepEqual(streamed.map((e) => e.token), content.map((e) => e.token));
  const c = await client.completions.create({ model: 'tiny', prompt: 'Once upon a time', max_tokens: 4, temperature: 0,
                                              ignore_eos: true, logprobs: 2 });
  const lp = c.choices[0].logprobs;
  assert.equal(lp.tokens.length, 4);
  assert.equal(lp.token_logprobs.length, 4);
  assert.equal(lp.top_logprobs.length, 4);
  assert.equal(lp.text_offset.length, 4);
});

await test('tools, tool_choice and a tool round trip in the messages', async () => {
  const tools = [{ type: 'function', function: { name: 'get_weather', description: 'Weather of a city',
                   parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } }];
  const convo = [...messages,
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: 'sunny, 21 C' }];
  const r = await client.chat.completions.create({ model: 'tiny', messages: convo, tools, tool_choice: 'auto', max_tokens: 4 });
  assert.ok(['stop', 'length', 'tool_calls'].includes(r.choices[0].finish_reason));
  const s = await client.chat.completions.create({ model: 'tiny', messages: convo, tools, max_tokens: 4, stream: true });
  let n = 0;
  for await (const chunk of s) n++;
  assert.ok(n >= 2);
});

await test('tool_choice naming a function / required: the reply is a tool call (non-stream and stream)', async () => {
  const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } },
                 { type: 'function', function: { name: 'get_time', parameters: { type: 'object' } } }];
  const tool_choice = { type: 'function', function: { name: 'get_time' } };
  const r = await client.chat.completions.create({ model: 'tiny', messages, tools, tool_choice, max_tokens: 4, temperature: 0 });
  const calls = r.choices[0].message.tool_calls;
  assert.equal(calls.length, 1);
  assert.equal(calls[0].type, 'function');
  assert.equal(calls[0].function.name, 'get_time');
  assert.equal(r.choices[0].message.content, null);
  const s = await client.chat.completions.create({ model: 'tiny', messages, tools, tool_choice, max_tokens: 4, temperature: 0, stream: true });
  let name = '', args = '';
  for await (const chunk of s)
    for (const tc of chunk.choices[0]?.delta?.tool_calls ?? []) {
      name += tc.function?.name ?? '';
      args += tc.function?.arguments ?? '';
    }
  assert.equal(name, 'get_time');
  assert.equal(args, calls[0].function.arguments);
  const q = await client.chat.completions.create({ model: 'tiny', messages, tools, tool_choice: 'required', max_tokens: 4 });
  assert.ok(q.choices[0].message.tool_calls.length >= 1);
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages, tools, max_tokens: 4,
                                                        tool_choice: { type: 'function', function: { name: 'nope' } } }),
                       (e) => e instanceof OpenAI.BadRequestError && e.param === 'tool_choice');
});

await test('completions.create (non-stream and stream)', async () => {
  const r = await client.completions.create({ model: 'tiny', prompt: 'Once upon a time', max_tokens: 6, temperature: 0, ignore_eos: true });
  assert.equal(r.object, 'text_completion');
  assert.equal(r.usage.completion_tokens, 6);
  const s = await client.completions.create({ model: 'tiny', prompt: 'Once upon a time', max_tokens: 6, temperature: 0, ignore_eos: true, stream: true });
  let text = '';
  for await (const chunk of s) text += chunk.choices[0]?.text ?? '';
  assert.equal(text, r.choices[0].text);
});

await test('models.list and models.retrieve', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids, ['tiny']);
  assert.equal((await client.models.retrieve('tiny')).id, 'tiny');
});

await test('errors: AuthenticationError, BadRequestError, NotFoundError', async () => {
  const bad = new OpenAI({ apiKey: 'sk-wrong', baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 0 });
  await assert.rejects(bad.chat.completions.create({ model: 'tiny', messages, max_tokens: 2 }),
                       (e) => e instanceof OpenAI.AuthenticationError && e.status === 401 && e.code === 'invalid_api_key');
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages, max_tokens: 2, temperature: 9 }),
                       (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === 'temperature');
  await assert.rejects(client.chat.completions.create({ model: 'gpt-4o', messages, max_tokens: 2 }),
                       (e) => e instanceof OpenAI.NotFoundError && e.status === 404);
});

srv.kill('SIGTERM');
const { code } = await exited;
await test('dsrt serve stops cleanly on SIGTERM', async () => assert.equal(code, 0));
console.log(`openai ${version}, node ${process.version}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
