"""The fakes the tests, the demo and the benchmarks run: fake_nbia (TCIA's NBIA v4 service; also
a program, ``python3 tests/fakes/fake_nbia.py --help``), fake_s3 (IDC's public S3 buckets) and
fake_ascli (IBM's ascli receiving a Faspex package: run as bin/ascli, put on PATH).
Their own tests are beside them. Import them as ``fakes.fake_nbia`` / ``fakes.fake_s3`` with
tests/ on sys.path (pytest.ini's pythonpath; bench/ inserts it)."""
