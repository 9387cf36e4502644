"""Guided decoding (structured output): a request's `response_format` compiled by xgrammar into a grammar whose
token bitmask the sampler applies before anything else.

`backend.GrammarBackend` compiles (one per engine, with xgrammar's cache); `state.GrammarState` is one request's
matcher; `state.fill_bitmasks` builds one step's masks for the guided rows of a batch. xgrammar is imported only when
a guided request arrives, so an engine without it still serves every other request.
"""

from lm_torch.guided.backend import GrammarBackend, xgrammar_available
from lm_torch.guided.state import GrammarState, fill_bitmasks

__all__ = ["GrammarBackend", "GrammarState", "fill_bitmasks", "xgrammar_available"]
