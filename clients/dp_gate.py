"""Whether a message involves DP, decided without importing Opacus.

Each Flower message runs in a fresh process, and importing ``fedsd.security.privacy`` or
``fedsd.clients.dp_training`` imports Opacus (about a second and a half here, most of a handler's
cost when features are cached). The ClientApp asks these questions first and imports the DP modules
only when the answer is yes. The key names are those of ``fedsd.security.privacy.DP_KEYS``,
``PrivacyLedger.STATE_KEY`` and ``fedsd.clients.dp_training.LOCAL_METRICS_KEY``; a test
(tests/test_round_overhead.py) checks that they stay equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DP_RECORD_KEYS = frozenset(
    {
        "dp-noise-multiplier",
        "dp-target-epsilon",
        "dp-max-grad-norm",
        "dp-delta",
        "dp-rounds",
        "dp-epsilon-budget",
        "dp-accountant",
    }
)
"""``fedsd.security.privacy.DP_KEYS.values()``: the ``dp-*`` keys of a node config and of a train config."""
LEDGER_STATE_KEY = "fedsd-dp"
"""``fedsd.security.privacy.PrivacyLedger.STATE_KEY``."""
LOCAL_METRICS_KEY = "fedsd-local-metrics"
"""``fedsd.clients.dp_training.LOCAL_METRICS_KEY``."""


def dp_keys_present(*records: Mapping[str, Any]) -> bool:
    """True when any record sets a ``dp-*`` key (to something other than "" or None): exactly when
    ``DPSettings.from_records`` may return settings rather than None."""
    return any(k in r and r[k] not in ("", None) for r in records for k in DP_RECORD_KEYS)


def dp_in_use(context: Any, config: Mapping[str, Any]) -> bool:
    """``fedsd.clients.dp_training.dp_in_use`` without the import: the device's own ``dp-*`` flags, the
    server's DP settings in ``config``, or a privacy ledger in its state."""
    if dp_keys_present(dict(context.node_config), config):
        return True
    return LEDGER_STATE_KEY in context.state.config_records


def pop_local_metrics(context: Any) -> dict[str, Any]:
    """``fedsd.clients.dp_training.pop_local_metrics`` without the import (what DP kept off the wire)."""
    if LOCAL_METRICS_KEY not in context.state.metric_records:
        return {}
    from fedsd.clients.dp_training import pop_local_metrics as pop

    return pop(context)
