"""``--lookup [--draft-max N]``, the same in ``run``, ``chat``, ``serve`` and ``webui``: speculative decoding by
prompt lookup (``ggml_backend/speculative.py``), with llama.cpp's spellings of the draft size."""
from __future__ import annotations

from ..speculative import DEFAULT_DRAFT_MAX, MAX_DRAFT


def add_lookup_arguments(parser) -> None:
    parser.add_argument("--lookup", action="store_true",
                        help="speculative decoding by prompt lookup: drafts copied from where the last tokens "
                             "occurred before in the context, verified in one pass; the same output, faster where "
                             "it repeats its input (code edits, quoting)")
    parser.add_argument("--draft-max", "--draft_max", "--draft", "--draft-n", type=int, default=None, metavar="N",
                        help=f"with --lookup: the most tokens drafted at a time (default {DEFAULT_DRAFT_MAX}; at "
                             f"most {MAX_DRAFT})")


def lookup_draft_max(args) -> int:
    """The most tokens drafted at a time that the flags ask for; 0: no speculative decoding. ValueError for
    ``--draft-max`` without ``--lookup`` or out of range."""
    if args.draft_max is not None and not args.lookup:
        raise ValueError("--draft-max needs --lookup (speculative decoding by prompt lookup)")
    if not args.lookup:
        return 0
    draft_max = DEFAULT_DRAFT_MAX if args.draft_max is None else args.draft_max
    if not 1 <= draft_max <= MAX_DRAFT:
        raise ValueError(f"--draft-max must be between 1 and {MAX_DRAFT}, got {draft_max}")
    return draft_max
