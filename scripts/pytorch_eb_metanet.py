"""PyTorch CPU reference of eb-metanet's meta-training step, for speed comparison.

Reads the same experiment config as `fewshot bench --suite train` and builds the
same model (conv-4 with batch-statistics batch norm, U, V, e), episode shapes,
meta-batch, Adam and gradient-norm clipping. Episodes are random images of the
right shape: both sides time the step, not the data. Prints one JSON object.

Usage: python pytorch_eb_metanet.py CONFIG.json [--episodes N] [--threads 2]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

WARMUP_STEPS = 3


def conv4(channels, filters, blocks, downsample):
    layers = []
    for block in range(blocks):
        stride = 2 if downsample == "stride2" else 1
        layers.append(torch.nn.Conv2d(channels if block == 0 else filters, filters, 3, stride, 1, bias=False))
        # Batch statistics always, as ours: no running averages.
        layers.append(torch.nn.BatchNorm2d(filters, track_running_stats=False))
        layers.append(torch.nn.ReLU())
        if downsample == "max-pool":
            layers.append(torch.nn.MaxPool2d(2))
    return torch.nn.Sequential(*layers)


class MetaNetwork(torch.nn.Module):
    def __init__(self, channels, filters, blocks, downsample, hidden):
        super().__init__()
        self.embedding = conv4(channels, filters, blocks, downsample)
        self.U = torch.nn.Parameter(torch.randn(hidden, filters) * 0.1)
        self.V = torch.nn.Parameter(torch.randn(hidden, filters) * 0.1)
        self.e = torch.nn.Parameter(torch.zeros(hidden))

    def forward(self, support, support_labels, query, ways):
        h = self.embedding(torch.cat([support, query])).mean(dim=(2, 3))
        hs, hq = h[: len(support)], h[len(support):]
        w = hs @ self.U.t() + self.e
        onehot = F.one_hot(support_labels, ways).float().t()
        W = (onehot @ w) / onehot.sum(1, keepdim=True)
        return (hq @ self.V.t()) @ W.t()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = json.load(open(args.config))
    algorithm = config.get("algorithm", {})
    embedding = algorithm.get("embedding", {})
    data = config.get("data", {})
    image = embedding.get("image_size", data.get("image_size", 28))
    channels = embedding.get("in_channels", 1)
    filters = embedding.get("filters", 64)
    blocks = embedding.get("blocks", 4)
    downsample = embedding.get("downsample", "max-pool")
    hidden = algorithm.get("hidden_dim", 128)
    optimizer_config = algorithm.get("optimizer", {})
    lr = optimizer_config.get("lr", 1e-3)
    clip = optimizer_config.get("max_grad_norm", 1.0)
    episode = {"ways": 5, "shots": 1, "queries": 15, **config.get("train_episodes", {})}
    meta_batch = config.get("training", {}).get("meta_batch", 4)
    ways, shots, queries = episode["ways"], episode["shots"], episode["queries"]

    model = MetaNetwork(channels, filters, blocks, downsample, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    support_labels = torch.arange(ways).repeat_interleave(shots)
    query_labels = torch.arange(ways).repeat_interleave(queries)

    steps = max(1, -(-args.episodes // meta_batch))
    times = []
    for step in range(WARMUP_STEPS + steps):
        batch = [
            (torch.rand(ways * shots, channels, image, image), torch.rand(ways * queries, channels, image, image))
            for _ in range(meta_batch)
        ]
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = sum(
            F.cross_entropy(model(s, support_labels, q, ways), query_labels) for s, q in batch
        ) / meta_batch
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({
        "suite": "train",
        "implementation": f"pytorch {torch.__version__}, {args.threads} threads",
        "steps": len(times),
        "median_step_ms": median * 1e3,
        "episodes_per_second": meta_batch / median,
    }))


if __name__ == "__main__":
    main()
