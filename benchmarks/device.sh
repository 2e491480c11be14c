#!/usr/bin/env bash
# The accelerator checks, as one script: environment and matmul precision, the sweep and
# neural-ODE benchmarks, the sweep and projection tests, the orbit benchmark, then
# `gaugejax report`. Each step gets what is left of a total time budget, so that the script
# ends inside it whatever hangs; logs and JSON go to $OUT.
#
#     OUT=/tmp/device BUDGET_S=500 bash benchmarks/device.sh
#     STEPS="env tests report" TESTS="tests/test_infer.py" bash benchmarks/device.sh
#
# Needs jax with an accelerator backend and the runtime dependencies importable; gaugejax is
# taken from this checkout (PYTHONPATH), not installed. QUICK=1 runs the benchmarks'
# --quick modes (a smoke test of this script on a CPU).
set -u
OUT=${OUT:-/tmp/gaugejax-device}
BUDGET_S=${BUDGET_S:-500}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the report runs its models in two processes: neither may take most of the GPU's memory
export XLA_PYTHON_CLIENT_PREALLOCATE=false
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
start=$(date +%s)
log="$OUT/device.log"
: >"$log"

STEPS=${STEPS:-"env sweep_benchmark node_benchmark tests orbits_benchmark report"}
TESTS=${TESTS:-"tests/test_sweep.py tests/test_horizontal.py"}

step() {  # step NAME MIN_SECONDS CMD...: run CMD with what is left of the budget
    local name=$1 need=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    local left=$((BUDGET_S - ($(date +%s) - start)))
    if [ "$left" -lt "$need" ]; then
        echo "== $name: skipped, ${left}s left" | tee -a "$log"
        return
    fi
    echo "== $name (at most ${left}s)" | tee -a "$log"
    local t0
    t0=$(date +%s)
    timeout "$left" "$@" >>"$log" 2>&1
    echo "== $name: rc=$? in $(($(date +%s) - t0))s" | tee -a "$log"
}

step env 5 $PY - <<'EOF'
import importlib.metadata as md, os
import jax, jax.numpy as jnp, numpy as np
for p in ["jax", "jaxlib", "equinox", "diffrax", "optax", "lineax", "optimistix", "chex", "numpy"]:
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "missing")
print("devices", jax.devices(), "cpus", os.cpu_count())
# float32 matmuls at the default precision: on some accelerators they round the operands
# (TF32 on NVIDIA), which sets the floor of every float32 invariance error
k1, k2 = jax.random.split(jax.random.key(0))
a = jax.random.normal(k1, (512, 512), jnp.float32)
b = jax.random.normal(k2, (512, 512), jnp.float32)
ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
for prec in [None, "high", "highest"]:
    out = jnp.matmul(a, b, precision=prec)
    err = float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))
    print(f"float32 matmul precision={prec}: rel. error vs highest {err:.2e}")
(eqn,) = [e for e in jax.make_jaxpr(lambda c, xs: jax.lax.scan(lambda c, x: (c * x, c), c, xs))(
    a[0], a).jaxpr.eqns if e.primitive.name == "scan"]
print("scan parameters:", sorted(eqn.params))
EOF

step sweep_benchmark 60 $PY benchmarks/sweep.py "${quick[@]}" --out "$OUT/sweep.json"
step node_benchmark 60 $PY benchmarks/node.py "${quick[@]}" --out "$OUT/node.json"
# shellcheck disable=SC2086
step tests 60 $PY -m pytest -p no:cacheprovider -o addopts="" -m "not slow" -q -rfE $TESTS
step orbits_benchmark 60 $PY benchmarks/orbits.py "${quick[@]}" --out "$OUT/orbits.json"
step report 40 $PY -m gaugejax report --json "$OUT/report.json"
echo "== total $(($(date +%s) - start))s" | tee -a "$log"
grep -E "^== |speedup|ratio|target|passed|failed|error|Error" "$log" | tail -n 80
