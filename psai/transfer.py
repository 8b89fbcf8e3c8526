"""Export and import of models, agents and their links, as JSON in
PolicySynth's row format (the shape PsAiModelSchema and PsAgentSchema dump).

An import is all or nothing: every row is checked before anything is
written, the writes share one transaction, and an error names the table,
the row and the field. Rows are matched by uuid, so importing the same file
twice changes nothing the second time.
"""
from .db import write_transaction
from .errors import ValidationError
from .models import AgentModels, PsAgent, PsAiModel
from .schemas import INCLUDE, RAISE, PsAgentSchema, PsAiModelSchema

__all__ = ["export_data", "import_data", "TABLES"]

TABLES = ("ps_ai_models", "ps_agents", "AgentModels")


def export_data():
    """Every model, agent and link, JSON-ready. A row psai would refuse is
    exported as stored (`psai check` says what is wrong with it)."""
    from .check import dump_rows
    return {
        "ps_ai_models": [dump for dump, _problem in dump_rows(
            PsAiModelSchema(), PsAiModel.select().order_by(PsAiModel.id), model=True)],
        "ps_agents": [dump for dump, _problem in dump_rows(PsAgentSchema(), PsAgent.select().order_by(PsAgent.id))],
        "AgentModels": [
            {"agent_id": link.agent_id, "ai_model_id": link.ai_model_id}
            for link in AgentModels.select().order_by(AgentModels.agent, AgentModels.ai_model)
        ],
    }


def _load_rows(schema, rows, table, errors, progress):
    loaded = []
    if not isinstance(rows, list):
        errors[table] = ["Must be a list of rows."]
        return loaded
    for index, row in enumerate(rows):
        try:
            loaded.append(schema.load(row))
        except ValidationError as exc:
            errors.setdefault(table, {})[index] = exc.messages
            loaded.append(None)
        progress()
    return loaded


def import_data(data, *, allow_unknown_keys=False, progress=None):
    """Import an ``export_data()`` document. Returns counts of what changed.
    ``progress``, if given, is called as ``progress(done, total)`` as rows are checked."""
    if not isinstance(data, dict):
        raise ValidationError({"_schema": ["An import is a JSON object with %s." % ", ".join(TABLES)]})
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ValidationError({key: ["Unknown table."] for key in unknown})
    total = sum(len(rows) for rows in data.values() if isinstance(rows, list))
    checked = [0]

    def step():
        checked[0] += 1
        if progress:
            progress(checked[0], total)
    errors = {}
    model_schema = PsAiModelSchema(unknown=INCLUDE if allow_unknown_keys else RAISE, as_rows=False)
    models = _load_rows(model_schema, data.get("ps_ai_models", []), "ps_ai_models", errors, step)
    agents = _load_rows(PsAgentSchema(as_rows=False), data.get("ps_agents", []), "ps_agents", errors, step)
    links = data.get("AgentModels", [])
    model_ids = {row.get("id") for row in models if row}
    agent_ids = {row.get("id") for row in agents if row}
    for index, row in enumerate(agents):
        parent = row and row.get("parent_agent_id")
        if parent is not None and parent not in agent_ids:
            errors.setdefault("ps_agents", {}).setdefault(index, {})["parent_agent_id"] = [
                "No agent with id %s in this file." % parent]
    if not isinstance(links, list):
        errors["AgentModels"] = ["Must be a list of rows."]
        links = []
    for index, link in enumerate(links):
        problems = {}
        if not isinstance(link, dict) or set(link) != {"agent_id", "ai_model_id"}:
            problems["_schema"] = ["A link is {\"agent_id\": ..., \"ai_model_id\": ...}."]
        elif not all(isinstance(link[k], int) and not isinstance(link[k], bool) for k in link):
            problems.update({k: ["Not an integer id."] for k in link
                             if not isinstance(link[k], int) or isinstance(link[k], bool)})
        else:
            if link["agent_id"] not in agent_ids:
                problems["agent_id"] = ["No agent with id %s in this file." % link["agent_id"]]
            if link["ai_model_id"] not in model_ids:
                problems["ai_model_id"] = ["No model with id %s in this file." % link["ai_model_id"]]
        if problems:
            errors.setdefault("AgentModels", {})[index] = problems
        step()
    for table, rows in (("ps_ai_models", models), ("ps_agents", agents)):
        missing = [i for i, row in enumerate(rows) if row and "id" not in row]
        for index in missing:
            errors.setdefault(table, {}).setdefault(index, {})["id"] = ["Missing: links refer to rows by id."]
    if errors:
        raise ValidationError(errors)

    counts = {"created": 0, "updated": 0, "links": 0}
    with write_transaction():
        model_map = {row["id"]: _upsert(PsAiModel, row, counts) for row in models}
        # Parents may come after their children in the file: rows first, then parents.
        agent_map = {row["id"]: _upsert(PsAgent, {k: v for k, v in row.items() if k != "parent_agent_id"}, counts)
                     for row in agents}
        for row in agents:
            parent = row.get("parent_agent_id")
            parent = agent_map[parent] if parent is not None else None
            agent = PsAgent.get_by_id(agent_map[row["id"]])
            if agent.parent_agent_id != parent:
                agent.parent_agent = parent
                agent.save()
        rows = [{"agent": agent_map[link["agent_id"]], "ai_model": model_map[link["ai_model_id"]]}
                for link in links]
        if rows:
            before = AgentModels.select().count()
            AgentModels.insert_many(rows).on_conflict_ignore().execute()
            counts["links"] = AgentModels.select().count() - before
    return counts


def _upsert(model_class, row, counts):
    """Insert the row, or update the row with its uuid; return its id here."""
    # updated_at is psai's to set (every save refreshes it), so it is not compared.
    fields = {key: value for key, value in row.items() if key not in ("id", "updated_at")}
    existing = model_class.get_or_none(model_class.uuid == fields["uuid"]) if "uuid" in fields else None
    if existing is None:
        instance = model_class(**fields)
        instance.save(force_insert=True)
        counts["created"] += 1
        return instance.id
    changed = {key: value for key, value in fields.items() if getattr(existing, key) != value}
    if changed:
        for key, value in changed.items():
            setattr(existing, key, value)
        existing.save()
        counts["updated"] += 1
    return existing.id
