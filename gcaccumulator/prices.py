"""USD prices for outcome currencies (``PRICE_SOURCE``).

``static:3400`` values one unit of any currency at 3400 USD;
``static:eth=3400,shib=0.00001`` names each currency. ``coingecko`` asks
CoinGecko's simple-price API with a short timeout and caches each answer
briefly. A price that cannot be had raises ``PriceUnavailable``; the caller
then falls back to the invoice's USD amount and says so in ``usd_source``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Protocol

import requests

from shared import money
from shared.config import PriceSource, Settings

# CoinGecko's coin ids for the outcome currencies NOWPayments settles in.
COINGECKO_IDS = {
    "eth": "ethereum",
    "btc": "bitcoin",
    "ltc": "litecoin",
    "trx": "tron",
    "bnb": "binancecoin",
    "bnbbsc": "binancecoin",
    "sol": "solana",
    "ton": "the-open-network",
    "doge": "dogecoin",
    "matic": "matic-network",
    "shib": "shiba-inu",
    "usdt": "tether",
    "usdterc20": "tether",
    "usdttrc20": "tether",
    "usdc": "usd-coin",
}

COINGECKO_URL = "https://api.coingecko.com/api/v3/simple/price"


class PriceUnavailable(Exception):
    """No trustworthy USD price for a currency right now."""


class Prices(Protocol):
    def usd_price(self, currency: str) -> Decimal:
        """USD for one unit of ``currency``; raises ``PriceUnavailable``."""
        ...


class StaticPrices:
    def __init__(self, source: PriceSource) -> None:
        self._prices = dict(source.static_prices)

    def usd_price(self, currency: str) -> Decimal:
        price = self._prices.get(currency, self._prices.get("*"))
        if price is None:
            raise PriceUnavailable(f"no static price for {currency}")
        return price


class CoinGeckoPrices:
    def __init__(
        self,
        timeout_s: float,
        cache_s: float,
        url: str = COINGECKO_URL,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._url = url
        self._session = session or requests.Session()
        self._clock = clock
        self._cache: dict[str, tuple[float, Decimal]] = {}
        self._lock = threading.Lock()

    def usd_price(self, currency: str) -> Decimal:
        coin = COINGECKO_IDS.get(currency)
        if coin is None:
            raise PriceUnavailable(f"no price feed for {currency}")
        now = self._clock()
        with self._lock:
            cached = self._cache.get(coin)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        price = self._fetch(coin)
        with self._lock:
            self._cache[coin] = (now, price)
        return price

    def _fetch(self, coin: str) -> Decimal:
        try:
            response = self._session.get(
                self._url,
                params={"ids": coin, "vs_currencies": "usd"},
                timeout=self._timeout_s,
            )
            response.raise_for_status()
            body = json.loads(response.text, parse_float=Decimal)
            price = money.parse_amount(body[coin]["usd"], "price")
        except (requests.RequestException, ValueError, KeyError, TypeError) as error:
            raise PriceUnavailable(
                f"{type(error).__name__} from the price API"
            ) from error
        if price <= 0:
            raise PriceUnavailable("the price API answered a non-positive price")
        return price


def make_prices(settings: Settings) -> Prices:
    source = settings.prices
    if source.kind == "static":
        return StaticPrices(source)
    return CoinGeckoPrices(
        timeout_s=settings.price_timeout_ms / 1000, cache_s=settings.price_cache_s
    )
