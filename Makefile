# Convenience targets; tools/run.sh does the real work (and works without make).
.PHONY: setup demo test export clean-nbs bench
setup: ; bash tools/run.sh setup
demo: ; bash tools/run.sh demo
test: ; bash tools/run.sh test
export: ; .venv/bin/nbdev_export && .venv/bin/nbdev_clean
bench: ; .venv/bin/python benchmarks/run_all.py
