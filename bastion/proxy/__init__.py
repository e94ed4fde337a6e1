"""The phase engine: requests, filters, responses."""

from bastion.proxy.exchange import Exchange, Response
from bastion.proxy.filters import Filter

__all__ = ["Exchange", "Filter", "Response"]
