set -x
mkdir -p /tmp/site/librmm && echo 'def load_library(): pass' > /tmp/site/librmm/__init__.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && mkdir -p /tmp/bin && xz -dc .whl/etcd.xz > /tmp/bin/etcd && chmod +x /tmp/bin/etcd && export PATH=/tmp/bin:$PATH UCX_WARN_UNUSED_ENV_VARS=n PYTHONUNBUFFERED=1 || exit 1;
export NCCL_NVLS_ENABLE=0 TANDEM_GIT_COMMIT=c6bb7bee5b06c46e3f28a087bafc83df49396e06
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 -m pytest --version
TANDEM_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_mixed_graphs.py 2>&1 | tail -15
TANDEM_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/integration/test_disaggregated.py -k "match_the_in_process" 2>&1 | tail -15
timeout 200 python3 -m tools.cli bench steps --out $OUT/steps_llama3-8b_nvidia-h100-80gb-hbm3.json 2>&1 | tail -60
timeout 280 python3 -m tools.cli bench roofline --out $OUT/roofline_llama3-8b_nvidia-h100-80gb-hbm3.json 2>&1 | tail -40
