"""Guided decoding (structured output): a request's `response_format` compiled by xgrammar into a grammar whose
token bitmask the sampler applies before anything else.

`pool.GrammarPool` compiles on worker threads (a time limit per compile, a bounded cache; one per engine) through
`backend.GrammarBackend`, which first checks a JSON schema with `schema.check_schema`; `state.GrammarState` is one
request's matcher; `state.fill_bitmasks` builds one step's masks for the guided rows of a batch. xgrammar is imported
only when a guided request arrives, so an engine without it still serves every other request.
"""

from lm_torch.guided.backend import GrammarBackend, xgrammar_available
from lm_torch.guided.pool import GrammarPool
from lm_torch.guided.schema import check_schema
from lm_torch.guided.state import GrammarState, fill_bitmasks

__all__ = ["GrammarBackend", "GrammarPool", "GrammarState", "check_schema", "fill_bitmasks", "xgrammar_available"]
