"""Trace replay load generator: `python -m bench.replay --help` (run from the repository root).

Modules: prompts (exact-length prompts from a fixed prompt set), client (asyncio + openai
streaming replay, /metrics scraping), args (shared trace/scaling options), server (start and
stop `adaspec serve` processes for the real-engine benchmarks).
"""
