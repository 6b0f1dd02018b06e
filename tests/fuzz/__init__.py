"""Coverage-guided fuzz targets for every parser that reads input from outside devmodel.

Each target module has `one_input(data: bytes) -> None`: it raises (AssertionError or any
exception a parser let escape) when an invariant breaks, and returns otherwise. atheris runs it
through `python -m tests.fuzz TARGET` (what scripts/fuzz does); tests/fuzz/test_corpus.py
replays the committed seed corpus through the same function under pytest.
"""
