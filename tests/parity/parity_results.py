"""(family, tower) -> min cosine vs transformers: filled by test_parity, printed by conftest's terminal summary."""

PARITY: dict[tuple[str, str], float] = {}
