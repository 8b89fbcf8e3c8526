// PolicySynth's side of the recording interop test: its own model classes
// (OpenAiChat, OpenAiResponses, ClaudeChat, GoogleGeminiChat, AzureOpenAiChat)
// called through its own PsAiModelManager against canned provider responses,
// and the usage item each call would have written. Usage:
//   node recording.mjs                  every scenario of $PSAI_ARGS (JSON list), one after another
// A scenario: {name, provider, model, config?, stream, response? (the JSON a non-streaming call
// gets), events? (a stream's chunks or events, sent as server-sent events), named? (with
// "event:" lines, as Anthropic sends them), done? (a final "data: [DONE]", as OpenAI sends)}.
// The result, per scenario: {name, error, requests, items (the usage item data PolicySynth's
// PsModelUsageItemManager builds, without its timestamp), counters (what saveTokenUsage got)}.
// No database is touched: saveTokenUsageItem and saveTokenUsage are replaced by captures.
// The provider APIs are a mock HTTP server on 127.0.0.1 (a free port), started and stopped here.
// The package directory comes from PS_AGENTS_DIR.
import { pathToFileURL } from "node:url";
import path from "node:path";
import fs from "node:fs";
import http from "node:http";

const dir = process.env.PS_AGENTS_DIR;
const load = (...parts) => import(pathToFileURL(path.join(dir, ...parts)).href);
const output = (result) => process.stdout.write("\n@@psai-result@@\n" + JSON.stringify(result) + "\n");

// Bounded: whatever hangs, the process ends.
const LIMIT_MS = Number(process.env.PSAI_NODE_TIMEOUT_MS || 90000);
setTimeout(() => {
  process.stderr.write(`recording.mjs: timed out after ${LIMIT_MS} ms\n`);
  process.exit(3);
}, LIMIT_MS).unref();

// Settings that would send a class elsewhere than the mock (Azure, Bedrock, Vertex, the EU
// host, another key) or stop it recording.
for (const name of ["PS_AGENT_OVERRIDE_OPENAI_API_KEY", "OPENAI_ENFORCE_EU_REGION", "AZURE_OPENAI_KEY",
                    "AZURE_ENDPOINT", "AZURE_DEPLOYMENT_NAME", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT",
                    "AWS_BEARER_TOKEN_BEDROCK", "USE_VERTEX_FOR_CLAUDE", "USE_GOOGLE_VERTEX_AI_FOR_CLAUDE",
                    "USE_CLAUDE_1M_CONTEXT_BETA_FLAG", "USE_GOOGLE_VERTEX_AI", "USE_GOOGLE_VERTEX_AI_FOR_MODELS",
                    "DISABLE_DB_USAGE_TRACKING", "PS_AGENT_GEMINI_API_KEY"]) {
  delete process.env[name];
}

const scenarios = JSON.parse(process.env.PSAI_ARGS);

// -- the mock provider ---------------------------------------------------------------------
let current = null;
const requests = [];
function serve(req, res) {
  let body = "";
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    let json = null;
    try { json = JSON.parse(body || "null"); } catch { json = null; }
    requests.push({ method: req.method, url: req.url, stream: json?.stream ?? null, speed: json?.speed ?? null,
                    beta: req.headers["anthropic-beta"] ?? null });
    const s = current;
    if (!s) {
      res.writeHead(500, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { message: "no scenario" } }));
      return;
    }
    if (s.stream) {
      res.writeHead(200, { "content-type": "text/event-stream" });
      for (const event of s.events) {
        if (s.named) res.write(`event: ${event.type}\n`);
        res.write(`data: ${JSON.stringify(event)}\n\n`);
      }
      if (s.done) res.write("data: [DONE]\n\n");
      res.end();
      return;
    }
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(s.response));
  });
}
const server = http.createServer(serve);
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${server.address().port}`;
process.env.OPENAI_BASE_URL = `${base}/v1`;  // OpenAiChat, OpenAiResponses and AzureOpenAiChat
process.env.ANTHROPIC_BASE_URL = base;
process.env.GOOGLE_GEMINI_BASE_URL = base;
process.env.WINSTON_LOG_LEVEL = process.env.WINSTON_LOG_LEVEL || "error";
process.env.DISABLE_DB_INIT = "1";

// AzureOpenAiChat asks DefaultAzureCredential for a token on every request: the same
// module instance PolicySynth imports (the hoisted ESM build) answers without Azure.
const identityPaths = [path.join(dir, "node_modules", "@azure", "identity", "dist", "esm", "index.js"),
                       path.join(dir, "..", "..", "@azure", "identity", "dist", "esm", "index.js")];
const identityPath = identityPaths.find((p) => fs.existsSync(p));
const identity = await import(pathToFileURL(identityPath).href);
identity.DefaultAzureCredential.prototype.getToken = async () => ({
  token: "psai-test-token", expiresOnTimestamp: Date.now() + 3600e3 });

const { PsAiModelManager } = await load("base", "agentModelManager.js");
const { PsModelUsageItemManager } = await load("base", "modelUsageItemManager.js");
const itemManager = new PsModelUsageItemManager();
const prices = { costInTokensPerMillion: 1, costOutTokensPerMillion: 2, costInCachedContextTokensPerMillion: 0.5 };

async function record(s) {
  // A DB-shaped model (id 77) and its access configuration, as PolicySynth loads them.
  const manager = new PsAiModelManager(
    [{ id: 77, configuration: { type: "text", modelSize: "medium", provider: s.provider, model: s.model, prices,
                                ...(s.config ?? {}) } }],
    [{ aiModelId: 77, apiKey: "psai-test-key" }], 4096, 0.7, "medium", 0, 5, 6);
  const captured = { name: s.name, error: null, items: [], counters: [] };
  manager.sleepBeforeRetry = async () => {};
  manager.saveTokenUsageItem = async (ctx) => {
    const data = itemManager.buildUsageItemData({ ...ctx, userId: manager.userId, agentId: manager.agentId });
    delete data.timestamp;
    captured.items.push({ persist: itemManager.shouldPersistUsageItem(ctx), data: JSON.parse(JSON.stringify(data)) });
  };
  manager.saveTokenUsage = async (...args) => { captured.counters.push(args.slice(5, 8)); };
  current = s;
  const before = requests.length;
  try {
    await manager.callModel("text", "medium", [{ role: "system", message: "Be brief." }, { role: "user", message: "Hi" }],
      { limitedRetries: true, overrideMaxRetries: 1, ...(s.stream ? { streamingCallbacks: () => {} } : {}) });
  } catch (error) {
    captured.error = String(error?.stack || error);
  }
  current = null;
  captured.requests = requests.slice(before);
  return captured;
}

const results = [];
for (const s of scenarios) results.push(await record(s));
server.closeAllConnections();
await new Promise((resolve) => server.close(resolve));
output(results);
process.exit(0);
