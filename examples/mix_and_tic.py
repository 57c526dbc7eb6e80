"""Stream mixing and time-continual rehearsal (TiC) with a plain DataLoader.

Both samplers yield batches of indices into ``ConcatDataset(datasets)``, so any map-style
datasets work; both resume from ``state_dict()`` on any world size.
``python examples/mix_and_tic.py``."""
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from fastload.batch.mixing import StreamMixer
from fastload.batch.tic import TiCSampler


def tagged(tag: int, n: int) -> TensorDataset:
    return TensorDataset(torch.full((n,), tag), torch.arange(n))


def main() -> dict:
    # 1. Mixing: a large set and a small fine-grained one, 80/20, 512 samples per epoch.
    big, small = tagged(0, 5000), tagged(1, 300)
    mixer = StreamMixer({"big": len(big), "small": len(small)}, [0.8, 0.2], epoch_size=512,
                        global_batch_size=64, seed=0)
    loader = DataLoader(ConcatDataset([big, small]), batch_sampler=mixer)
    it = iter(loader)
    first = next(it)
    state = mixer.state_dict()  # {"epoch": 0, "step": 1, "streams": {"big": 51, "small": 13}, ...}
    resumed = StreamMixer({"big": len(big), "small": len(small)}, [0.8, 0.2], epoch_size=512,
                          global_batch_size=64, seed=0)
    resumed.load_state_dict(state)
    rest = list(DataLoader(ConcatDataset([big, small]), batch_sampler=resumed))
    share = float(torch.cat([first[0]] + [b[0] for b in rest]).float().mean())
    print(f"mixing: {1 + len(rest)} steps, share of 'small' {share:.3f} (asked 0.2), counters {state['streams']}")

    # 2. TiC: five yearly splits; at year 4 replay old data with an exponentially decaying
    #    buffer of 400 samples; the budget is 1024 samples whatever the policy.
    years = [tagged(y, n) for y, n in enumerate([1000, 1200, 900, 1100, 800])]
    out = {}
    for policy in ("cumulative-all", "cumulative-equal", "cumulative-exp", "restricted"):
        tic = TiCSampler([len(d) for d in years], time_step=4, policy=policy, budget=1024,
                         global_batch_size=128, buffer_size=400, seed=0)
        got = torch.cat([b[0] for b in DataLoader(ConcatDataset(years), batch_sampler=tic)])
        out[policy] = torch.bincount(got, minlength=5).tolist()
        print(f"TiC {policy:17s} pool per year {tic.pool_counts()}, samples seen per year {out[policy]}")
    return {"share_small": share, "tic": out}


if __name__ == "__main__":
    main()
