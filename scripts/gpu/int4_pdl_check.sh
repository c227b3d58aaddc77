export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MINIINFER_CACHE=/root/mi-cache
python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_quant_gpu.py -k "programmatic or cuda_int4_kernel" 2>&1 | tail -8
python3 scripts/gpu/int4_shapes.py --codes 0 13 --splits 1 --pdl 0 1 --ms 1 16 --out $OUT/int4_shapes_pdl.json 2>&1 | grep -v "^{'K'" | tail -3
python3 -c "
import json
for r in json.load(open('$OUT/int4_shapes_pdl.json'))['rows']: print(r['K'], r['N'], r['M'], r['code'], r.get('pdl'), r.get('us'), r.get('vs bf16'), r.get('error'))"
