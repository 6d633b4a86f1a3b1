"""PyTorch reference of `fewshot bench --suite kernels`: the same cases,
shapes and work, for a side-by-side speed comparison, on the CPU or a GPU.

Cases (batches of 80 images, 5 classes; MAML tasks are 5-way 1-shot with 75
queries, second order through `torch.autograd.grad(create_graph=True)`):
  train-conv4-28  64-filter conv-4 with max-pooling on 1x28x28: forward, backward, Adam
  train-conv4-84  32-filter conv-4 with max-pooling on 3x84x84: forward, backward, Adam
  train-conv4-105 the train-conv4-28 net on 1x105x105 (Omniglot at full resolution)
  train-conv5-128-56  5 blocks of 128 filters with max-pooling on 1x56x56
  protonet-60way-28  a Prototypical Networks training step as the paper trains
                  Omniglot: a 60-way 1-shot 5-query episode (360 images) through
                  the train-conv4-28 embedding in one batch, prototypes, negative
                  squared distances, cross-entropy, Adam
  maml2-1step-28  MAML's Omniglot net (stride-2 convs), 1 inner step, exact meta-gradient
  maml2-5step-28  the same with 5 inner steps
  maml2-5step-84  MAML's miniImageNet net, 5 inner steps
  maml2-batch32-28  a meta-training step as the paper trains Omniglot 5-way 1-shot:
                  32 tasks of 5 support and 5 query images, 1 inner step, Adam
                  (tasks one after another, each one's meta-loss backpropagated
                  as learn2learn's examples do)
  eval-conv4-28   the train-conv4-28 net, forward only
Batch norm uses batch statistics (no running averages); the inner loop adapts
every weight but batch norm's, with the support loss scaled as the MAML
reference does (sum over examples / shots). Prints one JSON object:
{"device", "threads", "peak_rss_mib", "cases": [{"name", "median_ms", "repeats"}]},
on a GPU with each case's "peak_device_mib" (torch.cuda.max_memory_allocated).
On a GPU every step ends with torch.cuda.synchronize(), so a time is the
work's, not its queueing's; float32 products stay full precision (no TF32),
as candle's.

Usage: python pytorch_kernels.py [--case NAME ...] [--repeats 10] [--threads 2] [--device cpu|cuda]
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

BATCH, WAYS, SUPPORT, QUERY = 80, 5, 5, 75


def make_net(channels, side, filters, downsample, head, blocks=4, classifier=True):
    """Weights of a conv net with a 5-way linear classifier, as a dict."""
    params = {}
    for block in range(blocks):
        cin = channels if block == 0 else filters
        params[f"block{block}.conv.weight"] = torch.nn.init.xavier_uniform_(torch.empty(filters, cin, 3, 3))
        params[f"block{block}.bn.weight"] = torch.ones(filters)
        params[f"block{block}.bn.bias"] = torch.zeros(filters)
        side = side // 2 if downsample == "max-pool" else (side + 1) // 2
    features = filters if head == "mean" else filters * side * side
    if classifier:
        params["head.weight"] = torch.nn.init.xavier_uniform_(torch.empty(WAYS, features))
        params["head.bias"] = torch.zeros(WAYS)
    config = {"downsample": downsample, "head": head, "blocks": blocks, "classifier": classifier}
    return config, {k: v.to(DEVICE).requires_grad_() for k, v in params.items()}


def forward(config, params, x):
    for block in range(config["blocks"]):
        stride = 2 if config["downsample"] == "stride2" else 1
        x = F.conv2d(x, params[f"block{block}.conv.weight"], stride=stride, padding=1)
        x = F.batch_norm(x, None, None, params[f"block{block}.bn.weight"], params[f"block{block}.bn.bias"], training=True)
        x = F.relu(x)
        if config["downsample"] == "max-pool":
            x = F.max_pool2d(x, 2)
    x = x.mean(dim=(2, 3)) if config["head"] == "mean" else x.flatten(1)
    if not config["classifier"]:
        return x
    return F.linear(x, params["head.weight"], params["head.bias"])


DEVICE = torch.device("cpu")


def images(count, channels, side):
    return torch.rand(count, channels, side, side).to(DEVICE)


def labels(count):
    return (torch.arange(count) % WAYS).to(DEVICE)


def train_case(net, channels, side):
    config, params = net
    x, y = images(BATCH, channels, side), labels(BATCH)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(forward(config, params, x), y).backward()
        optimizer.step()

    return step


def protonet_case(ways, queries):
    config, params = make_net(1, 28, 64, "max-pool", "flatten", classifier=False)
    support, query = images(ways, 1, 28), images(ways * queries, 1, 28)
    query_labels = (torch.arange(ways * queries) % ways).to(DEVICE)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        embeddings = forward(config, params, torch.cat([support, query]))
        prototypes, queries_embedded = embeddings[:ways], embeddings[ways:]  # 1 shot: the support itself
        logits = -torch.cdist(queries_embedded, prototypes).pow(2)
        F.cross_entropy(logits, query_labels).backward()
        optimizer.step()

    return step


def eval_case(net):
    config, params = net
    x = images(BATCH, 1, 28)

    def step():
        with torch.no_grad():
            forward(config, params, x)

    return step


def maml_case(net, channels, side, inner_lr, steps):
    config, params = net
    support, query = images(SUPPORT, channels, side), images(QUERY, channels, side)
    support_labels, query_labels = labels(SUPPORT), labels(QUERY)
    names = list(params)
    adapted_names = [n for n in names if ".bn." not in n]

    def step():
        fast = dict(params)
        for _ in range(steps):
            # Cross-entropy summed over the support set and divided by the shots (1).
            loss = F.cross_entropy(forward(config, fast, support), support_labels, reduction="sum")
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted_names], create_graph=True)
            fast = dict(fast)
            for n, g in zip(adapted_names, grads):
                fast[n] = fast[n] - inner_lr * g
        meta_loss = F.cross_entropy(forward(config, fast, query), query_labels)
        torch.autograd.grad(meta_loss, [params[n] for n in names])

    return step


def maml_batch_case(net, inner_lr, tasks):
    config, params = net
    batch = [(images(WAYS, 1, 28), images(WAYS, 1, 28)) for _ in range(tasks)]
    y = labels(WAYS)
    adapted_names = [n for n in params if ".bn." not in n]
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        for support, query in batch:
            loss = F.cross_entropy(forward(config, params, support), y, reduction="sum")
            grads = torch.autograd.grad(loss, [params[n] for n in adapted_names], create_graph=True)
            fast = dict(params)
            for n, g in zip(adapted_names, grads):
                fast[n] = fast[n] - inner_lr * g
            (F.cross_entropy(forward(config, fast, query), y) / tasks).backward()
        optimizer.step()

    return step


def build(name):
    pooled_28 = lambda: make_net(1, 28, 64, "max-pool", "flatten")
    if name == "train-conv4-28":
        return train_case(pooled_28(), 1, 28)
    if name == "train-conv4-84":
        return train_case(make_net(3, 84, 32, "max-pool", "flatten"), 3, 84)
    if name == "train-conv4-105":
        return train_case(make_net(1, 105, 64, "max-pool", "flatten"), 1, 105)
    if name == "train-conv5-128-56":
        return train_case(make_net(1, 56, 128, "max-pool", "flatten", blocks=5), 1, 56)
    if name == "protonet-60way-28":
        return protonet_case(60, 5)
    if name == "eval-conv4-28":
        return eval_case(pooled_28())
    if name == "maml2-1step-28":
        return maml_case(make_net(1, 28, 64, "stride2", "mean"), 1, 28, 0.4, 1)
    if name == "maml2-5step-28":
        return maml_case(make_net(1, 28, 64, "stride2", "mean"), 1, 28, 0.4, 5)
    if name == "maml2-batch32-28":
        return maml_batch_case(make_net(1, 28, 64, "stride2", "mean"), 0.4, 32)
    if name == "maml2-5step-84":
        return maml_case(make_net(3, 84, 32, "max-pool", "flatten"), 3, 84, 0.01, 5)
    raise SystemExit(f"unknown case {name}")


CASES = ["train-conv4-28", "train-conv4-84", "train-conv4-105", "train-conv5-128-56", "protonet-60way-28", "maml2-1step-28", "maml2-5step-28", "maml2-5step-84", "maml2-batch32-28", "eval-conv4-28"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    on_gpu = DEVICE.type == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name in args.case or CASES:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(DEVICE)
        step = build(name)
        step()  # warm-up
        times = []
        for _ in range(max(args.repeats, 1)):
            start = time.perf_counter()
            step()
            if on_gpu:
                torch.cuda.synchronize(DEVICE)
            times.append(time.perf_counter() - start)
        result = {"name": name, "median_ms": statistics.median(times) * 1e3, "repeats": len(times)}
        if on_gpu:
            result["peak_device_mib"] = torch.cuda.max_memory_allocated(DEVICE) / 2**20
        results.append(result)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"device": str(DEVICE), "threads": args.threads, "torch": torch.__version__,
                      "peak_rss_mib": peak, "cases": results}))


if __name__ == "__main__":
    main()
