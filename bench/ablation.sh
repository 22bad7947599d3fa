#!/usr/bin/env bash
# full causal attention vs the shipped 4x7 window: MNIST, same data, epochs, seed and settings
# writes runs/abl-WINDOW/{ckpt,run,train.log,eval.log,sampler.log}; results quoted in BENCHMARKS.md
set -e
for w in 4,7 7,13; do  # 7,13: every earlier cell of a 7x7 grid (column half-width 6)
  d=runs/abl-$w; rm -rf $d; mkdir -p $d/ckpt
  cp checkpoints/mnist/vqvae.safetensors checkpoints/mnist/classifier.safetensors $d/ckpt/
  python3 -c "import json;c=json.load(open('checkpoints/mnist/config.json'));[c.pop(k,None) for k in ('transformer','evaluation','sampling_defaults')];c['training'].pop('transformer',None);json.dump(c,open('$d/ckpt/config.json','w'),indent=2)"
  OMP_NUM_THREADS=2 .venv/bin/python -m training transformer --checkpoint $d/ckpt --run-dir $d/run --epochs 10 --batch-size 128 --lr 1e-3 --d-model 128 --n-layer 4 --n-head 4 --window $w --seed 0 > $d/train.log 2>&1
  OMP_NUM_THREADS=2 .venv/bin/python -m training evaluate-generator --checkpoint $d/ckpt --samples 2000 --cfg-scale 1.5 --temperature 0.9 --no-write > $d/eval.log 2>&1
  OMP_NUM_THREADS=2 .venv/bin/python bench/sampler.py --checkpoint $d/ckpt --batch-sizes 1,64 --reference-sizes "" --out $d/sampler.json > $d/sampler.log 2>&1
done
echo done
