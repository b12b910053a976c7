"""The money path: one transaction script per message kind, and the pieces they share.

Every statement that changes a balance, a ledger, a subscription's paid
period, an API key's status, a top-up attempt or the entitlement
projection is a named block of ``db/sql/*.sql``.  Each ``apply_*``
function runs *inside* one caller's transaction, after the caller locked
the message's idempotency key row, and:

1. locks the account row (``SELECT ... FOR UPDATE``),
2. checks the balance inside that lock,
3. writes the ledger entry and the balance change in one statement,
4. returns an :class:`Effect` whose outcome the caller stores with the key.

Locks are always taken in the order idempotency key -> account ->
subscription -> API keys, so two messages never wait on each other in a
cycle (a deadlock that happens anyway is a transient error and is retried).

Modules:

* :mod:`.policy`: :class:`BillingPolicy` and the values passed around;
* :mod:`.keys`: idempotency keys (claim, lock, stored outcome);
* :mod:`.ledger`: the account lock, the ledger, the entitlement projection;
* :mod:`.funds`: the auto-top-up a short balance triggers, and the waits;
* :mod:`.outbox`, :mod:`.failures`, :mod:`.api_keys`;
* one script per kind: :mod:`.subscribe`, :mod:`.renew`,
  :mod:`.revoke_key`, :mod:`.top_up`;
* :mod:`.setup`: operators' set-up (accounts, plans, credits, settings).

Money is integer micros (1 USD = 1_000_000).  The ``balance_micros >= 0``
CHECK constraint is the last line of defence, not the mechanism.
"""

from __future__ import annotations

from ..errors import KeyNotReissuable
from .api_keys import hash_api_key
from .failures import SECRET_ARGUMENT, record_failure, redact
from .funds import resume_waiting, trigger_top_up
from .keys import (
    _CLAIM_KEYS,
    _COMPLETE_KEY,
    _LOCK_KEY,
    KeyClaim,
    claim_key,
    claim_keys,
    fail_key,
    lock_key,
    record_effect,
    unfinished_keys,
)
from .ledger import _LOCK_ACCOUNT, _SUBSCRIPTION_ACCOUNT
from .outbox import claim_stale_outbox, delete_outbox, insert_outbox
from .policy import (
    BillingPolicy,
    ClaimedKey,
    Effect,
    IssuedKey,
    OutboxMessage,
    TopUpIntent,
    message_request,
)
from .renew import _LOCK_SUBSCRIPTION, _RENEW_CHARGE, apply_renew, renew_fast_batch
from .revoke_key import apply_revoke_key
from .setup import (
    configure_auto_top_up,
    create_account,
    create_plan,
    create_user_key,
    credit_account,
    reissue_managed_key,
    set_cancel_at_period_end,
)
from .subscribe import apply_subscribe
from .top_up import TOP_UP_STATES, begin_top_up, finish_top_up, take_charge_lease

__all__ = [
    "BillingPolicy",
    "OutboxMessage",
    "IssuedKey",
    "Effect",
    "ClaimedKey",
    "TopUpIntent",
    "claim_key",
    "claim_keys",
    "KeyClaim",
    "renew_fast_batch",
    "lock_key",
    "unfinished_keys",
    "record_effect",
    "fail_key",
    "record_failure",
    "redact",
    "SECRET_ARGUMENT",
    "apply_subscribe",
    "apply_renew",
    "apply_revoke_key",
    "begin_top_up",
    "finish_top_up",
    "resume_waiting",
    "trigger_top_up",
    "message_request",
    "take_charge_lease",
    "TOP_UP_STATES",
    "create_account",
    "create_plan",
    "create_user_key",
    "credit_account",
    "configure_auto_top_up",
    "set_cancel_at_period_end",
    "insert_outbox",
    "delete_outbox",
    "claim_stale_outbox",
    "hash_api_key",
    "KeyNotReissuable",
    "reissue_managed_key",
]

#: The statements of one renewal by name, as ``bench/renewal_script.py``
#: reads them (``getattr(db.money, name)``) to generate the pgbench script.
_RENEWAL_STATEMENTS = (
    _CLAIM_KEYS,
    _LOCK_KEY,
    _SUBSCRIPTION_ACCOUNT,
    _LOCK_ACCOUNT,
    _LOCK_SUBSCRIPTION,
    _RENEW_CHARGE,
    _COMPLETE_KEY,
)
