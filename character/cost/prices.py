"""The price table: dollars per million tokens, per model, for prefill, sampling and training.

Tinker bills each separately and changes its rates, and its API reports no cost per run, so the
rates live in a dated JSON file: the one shipped here (`prices.json`), or another named by
`CHARACTER_PRICE_TABLE`. Local models (`tiny`, local folders) cost nothing; their tokens are still
counted. A Tinker model missing from the table has no price (None), never a guessed one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from character.cost.meter import KINDS
from character.errors import UserError

FREE = "local (free)"


@dataclass(frozen=True)
class Price:
    prefill: float
    sample: float
    train: float

    def cost(self, tokens: dict) -> float:
        """Dollars for {prefill, sample, train} token counts."""
        return sum(tokens.get(k, 0) * getattr(self, k) for k in KINDS) / 1e6


ZERO = Price(0.0, 0.0, 0.0)


def is_local_model(name: str) -> bool:
    """'tiny', a local folder or a file:// adapter: runs here, costs nothing."""
    return name == "tiny" or "/" not in name or name.startswith(("file://", "/", ".", "~")) or Path(name).exists()


@dataclass(frozen=True)
class PriceTable:
    as_of: str
    source: str
    path: str
    models: dict[str, Price]

    def price(self, model: str) -> Price | None:
        """The model's rates; ZERO for a local model; None when the table has no entry for it."""
        if is_local_model(model):
            return ZERO
        return self.models.get(model)

    def cost(self, tokens_by_model: dict[str, dict]) -> tuple[float | None, list[str]]:
        """Dollars for {model: tokens}, and the models without a price (then the total is None)."""
        total, unpriced = 0.0, []
        for model, tokens in tokens_by_model.items():
            p = self.price(model)
            if p is None:
                unpriced.append(model)
            else:
                total += p.cost(tokens)
        return (None if unpriced else total), unpriced


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The table at `path`, else CHARACTER_PRICE_TABLE, else the shipped one; a bad file is a UserError."""
    if path is None:
        from character.settings import Settings

        path = Settings().price_table
    if path is None:
        text, where = (resources.files("character.cost") / "prices.json").read_text(encoding="utf-8"), "prices.json"
    else:
        where = str(Path(path).expanduser())
        try:
            text = Path(where).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"price table {where} (CHARACTER_PRICE_TABLE): {e.strerror or e}") from None
    return parse_prices(text, where)


def parse_prices(text: str, where: str) -> PriceTable:
    try:
        data = json.loads(text)
        models = {name: Price(**{k: float(row[k]) for k in KINDS}) for name, row in (data.get("models") or {}).items()}
        if any(v < 0 for p in models.values() for v in (p.prefill, p.sample, p.train)):
            raise ValueError("a price is negative")
        return PriceTable(str(data.get("as_of", "?")), str(data.get("source", "")), where, models)
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"price table {where}: not a table of {{'models': {{name: {{prefill, sample, train}}}}}} "
            f"in $ per million tokens ({type(e).__name__}: {e})"
        ) from None
