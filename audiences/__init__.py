"""Audiences (issue 5, docs/audiences.md): definitions, evaluation with polars, membership with history,
lifecycle, upkeep and the Platform API's audience routes. Imports point one way: api -> audiences -> engine."""
