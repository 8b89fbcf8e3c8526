"""Recording token usage and reporting what it cost: the names psai has
always had here, from the modules that now hold them (``psai._recording``,
``psai.reports``)."""
from .errors import UnpricedUsageError
from ._recording import CACHE_WRITE_COUNTERS, NO_AGENT, model_cost, record_usage, usage_counters
from .reports import REPORT_GROUPINGS, cost_report, daily_costs, report_totals

__all__ = ["record_usage", "cost_report", "report_totals", "usage_counters", "REPORT_GROUPINGS", "model_cost",
           "UnpricedUsageError", "NO_AGENT", "daily_costs", "CACHE_WRITE_COUNTERS"]
