#!/usr/bin/env bash
# Prepare .article/ for scripts/article_code_bench.py: the article's own code (dvmazur/mixtral-offloading,
# unmodified) and the wheels of the environment it pins, to be carried to a GPU machine that has no internet.
# .article/ is never committed (this script adds it to .git/info/exclude): it holds someone else's code.
#
#   bash scripts/article_env.sh                    # on a machine that reaches GitHub and PyPI
#   ARTICLE_REPO=/path/to/clone HQQ_REPO=/path/to/hqq-clone bash scripts/article_env.sh   # from local clones
#
# Wheels (cp312, x86-64): transformers 4.36.1 (the article's pin), tokenizers 0.15.2 and huggingface_hub 0.20.3
# (versions transformers 4.36.1 accepts), termcolor (hqq imports it), and hqq built from the commit the article's
# requirements.txt pins (its pure-python part: the C++/CUDA extension is not built, as pip installing that
# commit gives). About 12 MB in all.
set -eu
cd "$(dirname "$0")/.."
ARTICLE_REPO=${ARTICLE_REPO:-https://github.com/dvmazur/mixtral-offloading}
ARTICLE_COMMIT=${ARTICLE_COMMIT:-ce54518}
HQQ_REPO=${HQQ_REPO:-https://github.com/mobiusml/hqq}
HQQ_COMMIT=37502bea31f2969c6680c0c4a88ca74b3bb234a5
PY=${PY:-python3}
grep -qx "/.article/" .git/info/exclude 2>/dev/null || echo "/.article/" >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf .article.tmp && mkdir -p .article.tmp/whl
git clone -q "$ARTICLE_REPO" "$work/article"
git -C "$work/article" archive "$ARTICLE_COMMIT" src | tar -x -C .article.tmp
git clone -q "$HQQ_REPO" "$work/hqq"
git -C "$work/hqq" checkout -q "$HQQ_COMMIT"
(cd "$work/hqq" && $PY -m pip wheel -q --no-deps . -w "$OLDPWD/.article.tmp/whl")
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .article.tmp/whl \
  transformers==4.36.1 tokenizers==0.15.2 huggingface_hub==0.20.3 termcolor==3.3.0
rm -rf .article && mv .article.tmp .article  # complete or absent: a broken run leaves only .article.tmp
ls -l .article/whl
