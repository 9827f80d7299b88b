#!/usr/bin/env bash
# One virtualenv per peer under .peers/ (ignored by git), each with the CPU build of torch.
# Peers are installed with --no-deps and their light run-time needs by hand, so no CUDA
# build of torch (pulled in by torchvision / torchaudio / bitsandbytes) is ever downloaded.
# Idempotent: a venv whose marker exists is left as it is. A peer that fails to install
# is reported and skipped; run_all.py records why.
set -u
PYTHON=${PYTHON:-python3}
ROOT=${PEERS_DIR:-.peers}
TORCH=${TORCH_SPEC:-torch==2.13.0}
COMMON="numpy transformers==5.24.0 tqdm safetensors scipy psutil"
mkdir -p "$ROOT"

# name | pip spec of the peer | extra pip flags | its light needs (beyond torch and COMMON)
PEERS=(
  "kronfluence|kronfluence==1.0.1||accelerate einconv einops opt-einsum"
  "traker|traker==0.3.2||"
  # logix-ai 0.1.1 declares Requires-Python <3.11 but runs on 3.11
  "logix-ai|logix-ai==0.1.1|--ignore-requires-python|einops pyyaml"
  "bergson|bergson==2.5.1||accelerate datasets huggingface-hub jaxtyping ml-dtypes natsort peft petname pyarrow pyyaml simple-parsing"
  # dattri-llm projects through dattri (installed --no-deps too: it would pull torchvision)
  "dattri-llm|dattri-llm==0.1.0 dattri==0.3.0||pyyaml"
)

for entry in "${PEERS[@]}"; do
  IFS='|' read -r name spec flags needs <<<"$entry"
  venv="$ROOT/$name"
  if [ -f "$venv/.installed" ]; then echo "bench-peers: $name ready"; continue; fi
  echo "bench-peers: installing $name into $venv"
  if "$PYTHON" -m venv "$venv" \
      && "$venv/bin/pip" install -q "$TORCH" \
      && "$venv/bin/pip" install -q --no-deps $flags $spec \
      && "$venv/bin/pip" install -q $COMMON $needs; then
    touch "$venv/.installed"
  else
    echo "bench-peers: $name could not be installed (see above); it will be recorded as skipped" >&2
    echo "pip install of $spec failed" > "$venv/.failed"
  fi
done
