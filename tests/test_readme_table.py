"""The README's benchmark block is generated from the newest results file, never hand-kept."""
from benchmarks.readme_table import README, START, latest_latency, render


def test_readme_latency_block_is_generated_from_the_latest_results():
    block = render(latest_latency())
    assert START in README.read_text()
    assert block in README.read_text(), "README.md is stale: run python -m benchmarks.readme_table --write"
