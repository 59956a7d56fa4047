"""The ledger model: YAML and custom-resource shapes validate strictly with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dbsync.pipeline.errors import ConfigurationError
from dbsync.pipeline.ledger import CheckName, LedgerConfig, load_ledger_config
from dbsync.pipeline.ledger_config import AmountStyle, parse_ledger_config

# The side-column ledger of the example application.
EXAMPLE_YAML = """\
postings:
  table: postings
  style: side
  transactionId: transaction_id
  amount: amount
  side: side
  debitValue: D
  creditValue: C
  currency: currency
  account: account_id
accounts:
  table: accounts
  id: id
  balance: balance
  normalSide: normal_side
transactions:
  table: transactions
  id: id
  bookedAt: created_at
fingerprint:
  dateSource: transactions
minorUnits:
  JPY: 0
statementTimeoutMs: 60000
maxOffendingKeys: 20
"""


def minimal(**postings: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"table": "postings", "style": "signed",
                            "transactionId": "transaction_id", "amount": "amount",
                            "fixedCurrency": "USD"}
    base.update(postings)
    return {"postings": base}


def test_example_yaml_validates(tmp_path: Path) -> None:
    """The example application's side-column YAML loads with every field in place."""
    path = tmp_path / "ledger.yaml"
    path.write_text(EXAMPLE_YAML, encoding="utf-8")
    config = load_ledger_config(path)
    assert config.postings.style is AmountStyle.SIDE
    assert config.postings.debit_value == "D"
    assert config.accounts is not None
    assert config.accounts.normal_side == "normal_side"
    assert config.minor_units_for("JPY") == 0
    assert config.minor_units_for("USD") == 2
    assert config.selected_checks() == tuple(CheckName)


def test_snake_case_names_are_accepted() -> None:
    """snake_case field names validate like their camelCase aliases."""
    config = LedgerConfig.model_validate({"postings": {
        "table": "entries", "style": "signed", "transaction_id": "txn", "amount": "amount",
        "fixed_currency": "EUR"}, "statement_timeout_ms": 5})
    assert config.postings.transaction_id == "txn"
    assert config.statement_timeout_ms == 5


def test_unknown_field_is_rejected() -> None:
    """A misspelt field is rejected with its path."""
    with pytest.raises(ConfigurationError, match=r"postings.ammount: unknown field"):
        parse_ledger_config(minimal(ammount="amount"), origin="spec")


def test_empty_check_list_is_rejected() -> None:
    """checks: [] would run nothing and report a balanced ledger, so it is an error."""
    data = minimal()
    data["checks"] = []
    with pytest.raises(ConfigurationError, match=r"checks: the list is empty, so no check "
                                                 r"would run: leave checks out"):
        parse_ledger_config(data, origin="spec")


def test_strict_types_reject_coercion() -> None:
    """A timeout given as a string is rejected instead of coerced."""
    data = minimal()
    data["statementTimeoutMs"] = "1000"
    with pytest.raises(ConfigurationError, match="statementTimeoutMs"):
        parse_ledger_config(data, origin="spec")


@pytest.mark.parametrize(("postings", "message"), [
    ({"style": "side"}, "postings.side is required when postings.style is side"),
    ({"style": "side", "side": "side", "debitValue": "D", "creditValue": "D"},
     "give the two side markers different values"),
    ({"style": "side", "side": "side", "debitValue": "D", "creditValue": 1},
     "both be text or both be integers"),
    ({"style": "debit_credit_columns", "amount": None, "debitAmount": "debit"},
     "postings.creditAmount is required"),
    ({"style": "debit_credit_columns", "debitAmount": "d", "creditAmount": "c"},
     "postings.amount does not apply"),
    ({"currency": "currency"}, "set exactly one of postings.currency"),
    ({"fixedCurrency": None}, "set exactly one of postings.currency"),
])
def test_style_columns_are_checked(postings: dict[str, Any], message: str) -> None:
    """Each amount style requires its own columns and forbids the others'."""
    with pytest.raises(ConfigurationError, match=message):
        parse_ledger_config(minimal(**postings), origin="spec")


def test_selected_check_needing_missing_table_is_rejected() -> None:
    """stored_balances without an accounts table is rejected when selected explicitly."""
    data = minimal()
    data["checks"] = ["stored_balances"]
    with pytest.raises(ConfigurationError, match=r"stored_balances needs accounts\.table"):
        parse_ledger_config(data, origin="spec")


def test_default_selection_fits_configuration() -> None:
    """Without accounts, headers or a currency column the default set drops their checks."""
    config = parse_ledger_config(minimal(), origin="spec")
    assert config.selected_checks() == (
        CheckName.TRANSACTION_BALANCE, CheckName.MINIMUM_LEGS, CheckName.TRIAL_BALANCE,
        CheckName.FIELD_SANITY, CheckName.FINGERPRINT)


def test_unknown_check_name_is_rejected() -> None:
    """An unknown check name is rejected with the list of valid ones."""
    data = minimal()
    data["checks"] = ["balance_sheet"]
    with pytest.raises(ConfigurationError, match=r"checks\.0: Input should be"):
        parse_ledger_config(data, origin="spec")


def test_missing_file_names_path(tmp_path: Path) -> None:
    """A missing file is a ConfigurationError naming its path."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigurationError, match=str(path)):
        load_ledger_config(path)


def test_non_mapping_yaml_is_rejected(tmp_path: Path) -> None:
    """A YAML list instead of a mapping is rejected naming the file."""
    path = tmp_path / "ledger.yaml"
    path.write_text("- postings\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="must be a YAML mapping"):
        load_ledger_config(path)


def test_json_schema_has_camel_case_properties() -> None:
    """The JSON schema the operator embeds in its CRD uses camelCase property names."""
    schema = LedgerConfig.model_json_schema(by_alias=True)
    assert "statementTimeoutMs" in schema["properties"]
    postings = schema["$defs"]["PostingsConfig"]["properties"]
    assert "transactionId" in postings
    assert schema["additionalProperties"] is False


def test_repeated_yaml_key_is_rejected(tmp_path: Path) -> None:
    """A key given twice is an error naming it, not a silent replacement of the first."""
    path = tmp_path / "ledger.yaml"
    path.write_text("postings:\n  table: postings\ncheckss: []\npostings:\n  table: other\n",
                    encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"at line 4, column 1: key 'postings' "
                                                 r"appears twice in one mapping"):
        load_ledger_config(path)


def test_unhashable_yaml_key_is_still_a_yaml_error(tmp_path: Path) -> None:
    """A list used as a key gets PyYAML's own error, not a crash in the duplicate check."""
    path = tmp_path / "ledger.yaml"
    path.write_text("? [a, b]\n: 1\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_ledger_config(path)
