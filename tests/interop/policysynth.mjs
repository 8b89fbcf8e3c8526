// PolicySynth's side of the interop test: its own Node package, its own
// Sequelize models and managers. Usage:
//   node policysynth.mjs sync|seed|read     its tables, some rows, all rows
//   node policysynth.mjs calls              record the calls in $PSAI_ARGS (JSON) as
//                                           its model manager does after each call
//   node policysynth.mjs item-costs         every item priced by its item cost manager
//   node policysynth.mjs reports            both its agent cost reports for the agent
//                                           tree of $PSAI_ARGS: items and counters
//   node policysynth.mjs calc               calcCostsFromItem on the items in the
//                                           file $PSAI_ARGS (no database)
// The package directory comes from PS_AGENTS_DIR; the database from
// PSQL_DB_NAME, PSQL_DB_USER, PSQL_DB_PASS, DB_HOST, DB_PORT.
import { pathToFileURL } from "node:url";
import path from "node:path";

import fs from "node:fs";

const dir = process.env.PS_AGENTS_DIR;
const load = (...parts) => import(pathToFileURL(path.join(dir, ...parts)).href);
const command = process.argv[2];
const output = (result) => process.stdout.write("\n@@psai-result@@\n" + JSON.stringify(result) + "\n");

if (command === "calc") {
  // Pure pricing: no database is touched.
  const { AgentCostItemManager } = await load("operations", "agentCostItemManager.js");
  const manager = new AgentCostItemManager();
  const items = JSON.parse(fs.readFileSync(process.env.PSAI_ARGS, "utf8"));
  output(items.map(({ data, fallback }) => manager.calcCostsFromItem(data, fallback).totalCost));
  process.exit(0);
}

const db = await load("dbModels", "index.js");
const { initializeModels, sequelize, PsAiModel, PsAgent, PsModelUsage, PsModelUsageItem, User, Group,
        PsAgentClass } = db;
await initializeModels();

const configuration = (name, size, extra = {}) => ({
  type: "text", modelSize: size, model: name, provider: "openai", active: true,
  prices: { costInTokensPerMillion: 2.5, costOutTokensPerMillion: 10,
            costInCachedContextTokensPerMillion: 1.25, currency: "USD" },
  maxTokensOut: 16384, defaultTemperature: 0.7, ...extra,
});

async function dump() {
  const AgentModels = sequelize.models.AgentModels;
  return {
    ps_ai_models: await PsAiModel.findAll({ raw: true, order: [["id", "ASC"]] }),
    ps_agents: await PsAgent.findAll({ raw: true, order: [["id", "ASC"]] }),
    AgentModels: await AgentModels.findAll({ raw: true, order: [["agent_id", "ASC"], ["ai_model_id", "ASC"]] }),
    ps_model_usage: await PsModelUsage.findAll({ raw: true, order: [["id", "ASC"]] }),
  };
}

let result;
if (command === "sync") {
  await sequelize.sync();
  result = { ok: true };
} else if (command === "seed") {
  const user = await User.create({ email: "psai@example.com", name: "psai" });
  const group = await Group.create({ name: "psai", user_id: user.id, community_id: 1, configuration: {},
                                     private_access_configuration: [] });
  const agentClass = await PsAgentClass.create({
    class_base_id: "00000000-0000-4000-8000-000000000001", user_id: user.id, name: "Researcher",
    version: 1, available: true, configuration: {},
  });
  const big = await PsAiModel.create({ user_id: user.id, organization_id: 2, name: "GPT-4o",
                                       configuration: configuration("gpt-4o", "large") });
  const small = await PsAiModel.create({ user_id: user.id, organization_id: 2, name: "GPT-4o mini",
    configuration: configuration("gpt-4o-mini", "small", { eloRating: 1200 }) });
  const parent = await PsAgent.create({ user_id: user.id, class_id: agentClass.id, group_id: group.id,
                                        configuration: { name: "Lead" } });
  // parent_agent_id references ps_ai_models in PolicySynth's own schema (its
  // association bug), so a parent id must also be a model id to be stored.
  const child = await PsAgent.create({ user_id: user.id, class_id: agentClass.id, group_id: group.id,
                                       configuration: { name: "Helper" }, parent_agent_id: parent.id });
  await parent.addAiModels([big, small]);
  await child.addAiModels([small]);
  await PsModelUsage.create({ user_id: user.id, model_id: big.id, agent_id: parent.id,
                              token_in_count: 1000, token_out_count: 200, token_in_cached_context_count: 100 });
  result = { user_id: user.id, group_id: group.id, class_id: agentClass.id, ...(await dump()) };
} else if (command === "read") {
  result = await dump();
  result.ps_model_usage_item = await PsModelUsageItem.findAll({ raw: true, order: [["id", "ASC"]] });
} else if (command === "calls") {
  // What PsAiModelManager does after each model call: saveTokenUsageItem,
  // then saveTokenUsage, with the prices configured at that moment.
  const { PsAiModelManager } = await load("base", "agentModelManager.js");
  for (const call of JSON.parse(process.env.PSAI_ARGS)) {
    const model = await PsAiModel.findByPk(call.modelId);
    const config = model.configuration;
    const manager = new PsAiModelManager([], {}, 4096, 0.7, "medium", 0, call.agentId, call.userId);
    await manager.saveTokenUsageItem({
      modelName: config.model, modelProvider: config.provider, prices: config.prices,
      modelType: config.type, modelSize: config.modelSize, tokensIn: call.tokensIn,
      cachedInTokens: call.cachedInTokens ?? 0, tokensOut: call.tokensOut, reasoningTokens: call.reasoningTokens,
      audioTokens: call.audioTokens, streaming: false, modelId: model.id,
      regionalProcessing: config.regionalProcessing, inferenceType: config.inferenceType,
      usageItemData: call.providerMetadata ? { providerMetadata: call.providerMetadata } : undefined,
    });
    await manager.saveTokenUsage(config.model, config.provider, config.prices, config.type, config.modelSize,
                                 call.tokensIn, call.cachedInTokens ?? 0, call.tokensOut, model.id);
  }
  result = { ok: true };
} else if (command === "item-costs") {
  const { AgentCostItemManager } = await load("operations", "agentCostItemManager.js");
  const manager = new AgentCostItemManager();
  const agentIds = (await PsAgent.findAll({ raw: true })).map((a) => a.id);
  const rows = await manager.fetchUsageItemRows(agentIds);
  result = {
    items: rows.map((row) => ({ agentId: row.agent_id,
                                totalCost: manager.calcCostsFromItem(manager.normalizeItemData(row.data),
                                                                     row.price_cfg).totalCost })),
    perAgent: Object.fromEntries(await Promise.all(agentIds.map(
      async (id) => [id, await manager.getSingleAgentCosts(id)]))),
  };
} else if (command === "reports") {
  const rootId = JSON.parse(process.env.PSAI_ARGS);
  const { AgentCostItemManager } = await load("operations", "agentCostItemManager.js");
  const { AgentCostManager } = await load("operations", "agentCostsManager.js");
  const counters = new AgentCostManager();
  const agentIds = await counters.getSubAgentIds(rootId);
  const items = new AgentCostItemManager();
  const sum = (rows) => rows.reduce((total, row) => total + row.totalCost, 0);
  result = {
    items: { report: await items.getAgentCosts(rootId, agentIds),
             exact: sum(await items.getDetailedAgentCosts(agentIds)) },
    counters: { report: await counters.getAgentCosts(rootId),
                exact: sum(await counters.getDetailedAgentCosts(rootId)) },
  };
} else {
  throw new Error("unknown command " + command);
}
await sequelize.close();
// PolicySynth logs to stdout too: the result follows a marker line.
output(result);
