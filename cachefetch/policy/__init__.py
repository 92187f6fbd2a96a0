"""The rules of a shared HTTP cache (RFC 9111, 9110, 5861, 9213, 9211), as pure functions.

Nothing here touches files, the app or the index: functions take headers,
request facts and clock readings, and return *plans* (typed, immutable
values) that the middleware only carries out:

- :func:`plan_request` → :class:`RequestPlan` (bypass, hit, stale hit,
  revalidate, miss, 504), with the :class:`CacheStatus` to answer with;
- :func:`plan_store` → :class:`StorePlan` (store these headers with this
  freshness, or why not);
- :func:`evaluate` → :class:`Answer` (a client's conditionals and Range);
- revalidation (:func:`conditional_fields`, :func:`select_for_update`,
  :func:`updated_headers`) and invalidation (:func:`invalidation_targets`).
"""
from .conditionals import Answer, Outcome, byte_range, evaluate, parse_etags, strong_match, weak_match
from .dates import format_http_date, parse_http_date
from .directives import ANY_STALENESS, DELTA_MAX, Directives, parse_cache_control, parse_targeted
from .freshness import (FOREVER, HEURISTIC_STATUSES, CacheRules, Lifetime, allows_stale, corrected_initial_age,
                        freshness_lifetime, parse_age, response_directives)
from .headers import (SHORT_VALUES_CHARS, environ_name, environ_names, has_validator, header, short_values,
                      stored_headers, variant_of, vary_names, without_fields)
from .invalidation import SAFE_METHODS, invalidates, invalidation_targets
from .lookup import (ttl_seconds, cookie_matters, Action, RequestFacts, RequestPlan, StoredResponse, plan_request, read_request, shareable,
                     stale_if_error_allows)
from .status import CACHE_NAME, ENVIRON_KEY, CacheStatus
from .storage import StorePlan, content_length, plan_store
from .validation import conditional_fields, select_for_update, updated_headers

__all__ = [
    "Answer", "Outcome", "byte_range", "evaluate", "parse_etags", "strong_match", "weak_match",
    "format_http_date", "parse_http_date",
    "ANY_STALENESS", "DELTA_MAX", "Directives", "parse_cache_control", "parse_targeted",
    "FOREVER", "HEURISTIC_STATUSES", "CacheRules", "Lifetime", "allows_stale", "corrected_initial_age",
    "freshness_lifetime", "parse_age", "response_directives",
    "environ_name", "environ_names", "short_values", "SHORT_VALUES_CHARS", "has_validator", "header",
    "stored_headers", "variant_of", "vary_names", "without_fields",
    "SAFE_METHODS", "invalidates", "invalidation_targets",
    "ttl_seconds", "cookie_matters", "Action", "RequestFacts", "RequestPlan", "StoredResponse", "plan_request", "read_request", "shareable",
    "stale_if_error_allows",
    "CACHE_NAME", "ENVIRON_KEY", "CacheStatus",
    "StorePlan", "content_length", "plan_store",
    "conditional_fields", "select_for_update", "updated_headers",
]
