"""Ledger model: which tables and columns hold the books, and which checks to run on them.

The same pydantic model is read from a YAML file by ``dbsync ledger`` and embedded in the
custom resource's spec by the operator, so it validates strictly, rejects unknown keys and
accepts both camelCase (Kubernetes style) and snake_case field names.  The model stays flat
(optional fields plus cross-field validators, no unions of objects) because Kubernetes
structural schemas cannot express ``oneOf`` between object shapes.
"""

from __future__ import annotations

import datetime
from collections.abc import Hashable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

import pydantic
import yaml
from pydantic import ConfigDict, Field, Strict, field_validator, model_validator
from pydantic.alias_generators import to_camel

from dbsync.pipeline.errors import ConfigurationError, describe_kind

DEFAULT_STATEMENT_TIMEOUT_MS = 300_000
DEFAULT_MAX_OFFENDING_KEYS = 20
DEFAULT_MINOR_UNITS = 2


class CheckName(StrEnum):
    """Identifiers of the ledger checks, as used in configuration and on the command line."""

    TRANSACTION_BALANCE = "transaction_balance"
    MINIMUM_LEGS = "minimum_legs"
    TRIAL_BALANCE = "trial_balance"
    STORED_BALANCES = "stored_balances"
    FIELD_SANITY = "field_sanity"
    MIXED_CURRENCY = "mixed_currency"
    ORPHANS = "orphans"
    FINGERPRINT = "fingerprint"


class AmountStyle(StrEnum):
    """Encoding of the debit or credit side on a posting row."""

    # One positive amount column plus a column holding a debit or credit marker.
    SIDE = "side"
    # One amount column whose sign is the side (debits positive unless debitSign is negative).
    SIGNED = "signed"
    # Two amount columns on each row, one for the debit and one for the credit (ERP style).
    DEBIT_CREDIT_COLUMNS = "debit_credit_columns"


class Sign(StrEnum):
    """Sign of a debit amount in a signed-amount ledger."""

    POSITIVE = "positive"
    NEGATIVE = "negative"


class NormalSide(StrEnum):
    """Side on which an account's balance grows."""

    DEBIT = "debit"
    CREDIT = "credit"


class DateSource(StrEnum):
    """Table that contains the date or timestamp column used for fingerprint buckets."""

    POSTINGS = "postings"
    TRANSACTIONS = "transactions"


# Enums arrive as plain strings from YAML and from the custom resource, which strict mode
# would reject, so enum fields alone are validated in lax mode.
LaxCheckName = Annotated[CheckName, Strict(False)]
LaxAmountStyle = Annotated[AmountStyle, Strict(False)]
LaxSign = Annotated[Sign, Strict(False)]
LaxDateSource = Annotated[DateSource, Strict(False)]
LaxNormalSide = Annotated[NormalSide, Strict(False)]
Identifier = Annotated[str, Field(min_length=1, max_length=63)]
TableName = Annotated[str, Field(min_length=1, max_length=127)]
SideMarker = Annotated[str, Field(min_length=1)] | int


class _LedgerModel(pydantic.BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
    )


class PostingsConfig(_LedgerModel):
    """The postings (journal lines) table: one row per leg of a transaction.

    ``table`` may be schema-qualified as ``schema.table``; every other field names a column
    of that table.
    """

    table: TableName
    style: LaxAmountStyle
    transaction_id: Identifier
    amount: Identifier | None = None
    side: Identifier | None = None
    debit_value: SideMarker | None = None
    credit_value: SideMarker | None = None
    debit_sign: LaxSign = Sign.POSITIVE
    debit_amount: Identifier | None = None
    credit_amount: Identifier | None = None
    currency: Identifier | None = None
    fixed_currency: Annotated[str, Field(min_length=1, max_length=16)] | None = None
    account: Identifier | None = None
    booked_at: Identifier | None = None

    @model_validator(mode="after")
    def _check_style_columns(self) -> Self:
        """Require exactly the columns that the chosen amount style reads."""
        if self.style is AmountStyle.DEBIT_CREDIT_COLUMNS:
            _require(self, "debit_amount", "credit_amount")
            _forbid(self, "amount", "side", "debit_value", "credit_value")
        else:
            _require(self, "amount")
            _forbid(self, "debit_amount", "credit_amount")
        if self.style is AmountStyle.SIDE:
            _require(self, "side", "debit_value", "credit_value")
            if self.debit_value == self.credit_value:
                raise ValueError(
                    f"postings.debitValue and postings.creditValue are both "
                    f"{self.debit_value!r}: give the two side markers different values")
            if type(self.debit_value) is not type(self.credit_value):
                raise ValueError(
                    "postings.debitValue and postings.creditValue must both be text or both "
                    "be integers, matching the type of the side column")
        else:
            _forbid(self, "side", "debit_value", "credit_value")

        if (self.currency is None) == (self.fixed_currency is None):
            raise ValueError(
                "set exactly one of postings.currency (a column) and postings.fixedCurrency "
                "(one currency code for the whole ledger)")
        return self


class AccountsConfig(_LedgerModel):
    """The accounts table, referenced by ``postings.account``.

    ``balance`` enables the stored-balance check.  The stored balance of a debit-normal
    account is its debits minus its credits, and the reverse for a credit-normal account.
    Without ``normal_side`` every account has ``default_normal_side``.  When the normal-side
    markers are unset they default to the postings' ``debitValue``/``creditValue`` for the
    side style, and to ``"D"``/``"C"`` otherwise.
    """

    table: TableName
    id: Identifier = "id"
    balance: Identifier | None = None
    normal_side: Identifier | None = None
    normal_debit_value: SideMarker | None = None
    normal_credit_value: SideMarker | None = None
    default_normal_side: LaxNormalSide = NormalSide.DEBIT


class TransactionsConfig(_LedgerModel):
    """The transaction header table, referenced by ``postings.transactionId``."""

    table: TableName
    id: Identifier = "id"
    booked_at: Identifier | None = None


class FingerprintConfig(_LedgerModel):
    """Bucketing of the source-against-target fingerprint: one bucket per day and currency.

    The day comes from ``booked_at`` of the table named by ``date_source``; a ``timestamp
    with time zone`` is cut into days in ``time_zone``.  Without a date column each currency
    is one bucket.
    """

    date_source: LaxDateSource = DateSource.POSTINGS
    time_zone: Annotated[str, Field(min_length=1)] = "UTC"


class LedgerConfig(_LedgerModel):
    """The whole ledger model: tables, currencies, selected checks and limits."""

    postings: PostingsConfig
    accounts: AccountsConfig | None = None
    transactions: TransactionsConfig | None = None
    minor_units: dict[Annotated[str, Field(min_length=1)], Annotated[int, Field(ge=0, le=18)]] = (
        Field(default_factory=dict))
    default_minor_units: Annotated[int, Field(ge=0, le=18)] = DEFAULT_MINOR_UNITS
    fingerprint: FingerprintConfig = Field(default_factory=FingerprintConfig)
    # An empty list would run no check and report a balanced ledger, so it is rejected.
    checks: Annotated[list[LaxCheckName], Field(min_length=1)] | None = None
    statement_timeout_ms: Annotated[int, Field(gt=0)] = DEFAULT_STATEMENT_TIMEOUT_MS
    max_offending_keys: Annotated[int, Field(ge=0, le=10_000)] = DEFAULT_MAX_OFFENDING_KEYS

    @field_validator("checks", mode="before")
    @classmethod
    def _reject_empty_selection(cls, value: object) -> object:
        if value == []:
            raise ValueError("the list is empty, so no check would run: leave checks out to "
                             "run every check the configuration allows, or name at least one")
        return value

    @model_validator(mode="after")
    def _check_selection(self) -> Self:
        """Reject explicitly selected checks whose tables or columns are not configured."""
        if self.checks is None:
            return self
        if len(set(self.checks)) != len(self.checks):
            raise ValueError("checks lists a check more than once: list each check once")
        for check in self.checks:
            missing = self.missing_for(check)
            if missing:
                raise ValueError(f"check {check.value} needs {missing}")
        return self

    def missing_for(self, check: CheckName) -> str | None:
        """Return what the configuration lacks for ``check``, or None when it can run."""
        if check is CheckName.STORED_BALANCES:
            if self.accounts is None or self.accounts.balance is None:
                return "accounts.table and accounts.balance"
            if self.postings.account is None:
                return "postings.account"
        if check is CheckName.MIXED_CURRENCY and self.postings.currency is None:
            return "postings.currency (a currency column; a fixed currency cannot mix)"
        if check is CheckName.ORPHANS:
            has_headers = self.transactions is not None
            has_accounts = self.accounts is not None and self.postings.account is not None
            if not (has_headers or has_accounts):
                return "transactions.table, or accounts.table with postings.account"
        uses_header_dates = self.fingerprint.date_source is DateSource.TRANSACTIONS
        if check is CheckName.FINGERPRINT and uses_header_dates and (
                self.transactions is None or self.transactions.booked_at is None):
            return "transactions.table and transactions.bookedAt (fingerprint.dateSource)"
        return None

    def selected_checks(self) -> tuple[CheckName, ...]:
        """Return the configured checks, or every check this configuration can run."""
        if self.checks is not None:
            return tuple(self.checks)
        return tuple(check for check in CheckName if self.missing_for(check) is None)

    def minor_units_for(self, currency: str) -> int:
        """Return the number of decimal places allowed for ``currency``."""
        return self.minor_units.get(currency, self.default_minor_units)


def _require(postings: PostingsConfig, *fields: str) -> None:
    for name in fields:
        if getattr(postings, name) is None:
            raise ValueError(
                f"postings.{to_camel(name)} is required when postings.style is "
                f"{postings.style.value}")


def _forbid(postings: PostingsConfig, *fields: str) -> None:
    for name in fields:
        if getattr(postings, name) is not None:
            raise ValueError(
                f"postings.{to_camel(name)} does not apply when postings.style is "
                f"{postings.style.value}: remove it")


def parse_ledger_config(data: object, *, origin: str) -> LedgerConfig:
    """Validate ``data`` (parsed YAML or a custom resource's spec) into a LedgerConfig.

    Raises ConfigurationError naming ``origin`` and the first invalid field.
    """
    try:
        return LedgerConfig.model_validate(data)
    except pydantic.ValidationError as error:
        raise ConfigurationError(f"{origin}: {_describe_validation_error(error)}") from None


def load_ledger_config(path: Path) -> LedgerConfig:
    """Read and validate a ledger YAML file.

    Raises ConfigurationError naming the file and, for invalid content, the field.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(
            f"cannot read ledger configuration {path}: {error.strerror or error}; "
            "pass the path of a readable YAML file") from None
    except UnicodeDecodeError as error:
        raise ConfigurationError(
            f"ledger configuration {path} is not UTF-8 text (invalid byte at offset "
            f"{error.start}): save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid syntax"
        raise ConfigurationError(
            f"ledger configuration {path} is not valid YAML{where}: {problem}") from None

    if not isinstance(data, dict):
        # safe_load returns None both for a file without any YAML node and for an explicit
        # null, so compose is needed to distinguish them in the message.
        if data is None and yaml.compose(text, Loader=yaml.SafeLoader) is None:
            found = "is empty (it contains only comments)" if text.strip() else "is empty"
        else:
            found = f"contains {describe_kind(data, _YAML_KINDS)} at the top level"
        raise ConfigurationError(
            f"ledger configuration {path} {found}: it must be a YAML mapping with at least a "
            "postings section (see examples/ledger.yaml in the dbsync repository)")
    return parse_ledger_config(data, origin=f"ledger configuration {path}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping.

    PyYAML keeps the last value of a repeated key without a word, so a second ``checks:``
    or ``postings:`` further down a long file would silently replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader itself rejects an unhashable key, with its position.
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping: keep one of them",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# bool comes before int because Python's bool is a subclass of int.
_YAML_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
    (list, "a list"), (set, "a set"), (bytes, "binary data"), (datetime.date, "a date"),
)


def _describe_validation_error(error: pydantic.ValidationError) -> str:
    """Summarize pydantic's errors as ``field: message`` parts (paths use the aliases)."""
    parts = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field: remove it or check its spelling"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)
