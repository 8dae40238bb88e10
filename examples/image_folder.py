"""Image files in torchvision's ImageFolder layout, with augmentation, cleaned by DenseNet-BC-40.

The training images are read from disk batch by batch (DataLoader workers), with
a random crop and flip drawn anew in every step; hydraclean seeds each sample's
transform from the step, so scoring sees the augmented images that training saw.
The trusted validation folder gets the evaluation transform. The flagged files
are printed with the label they were filed under and the one HYDRA suggests.

Without a root, the example writes scikit-learn's digits as PNG files into
ImageFolder layout (``train/<class>/*.png`` with 15% of them filed under a wrong
class, and ``val/<class>/*.png``) in a temporary directory, so it runs as
written with nothing to download.

    python examples/image_folder.py [ROOT] [--small] [--workers 2]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

from hydraclean import HydraLabelCleaner
from hydraclean.datasets import load_digits_images, make_label_noise
from hydraclean.models import densenet_bc_40

SIZE = 16


def write_digits_folder(root: Path, n_train: int, n_val: int) -> np.ndarray:
    """Digits as 16 x 16 PNGs in ImageFolder layout; returns which training files carry a wrong class."""
    X, y = load_digits_images()
    rng = np.random.RandomState(0)
    order = rng.permutation(len(y))[: n_train + n_val]
    X, y = X[order, 0], y[order]
    y_filed, noisy = make_label_noise(y[:n_train], 0.15, random_state=0)
    for split, images, labels in (("train", X[:n_train], y_filed), ("val", X[n_train:], y[n_train:])):
        for k, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (image / image.max() * 255).astype(np.uint8) if image.max() > 0 else image.astype(np.uint8)
            Image.fromarray(pixels).resize((SIZE, SIZE)).save(folder / f"{k:05d}.png")
    return noisy


def main(root: Path | None, small: bool, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        noisy = None
        if root is None:
            root = Path(tmp)
            noisy = write_digits_folder(root, 200 if small else 1400, 60 if small else 300)
        to_tensor = [v2.Grayscale(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        augment = v2.Compose([*to_tensor, v2.RandomCrop(SIZE, padding=2), v2.RandomHorizontalFlip()])
        train = datasets.ImageFolder(str(root / "train"), transform=augment)
        val = datasets.ImageFolder(str(root / "val"), transform=v2.Compose(to_tensor))
        assert train.classes == val.classes, "train/ and val/ must hold the same class folders"

        cleaner = HydraLabelCleaner(
            lambda n_classes: densenet_bc_40(n_classes, in_channels=1),
            max_epochs=1 if small else 8, batch_size=32, lr=0.05, num_workers=workers, random_state=0,
        )
        cleaner.fit(train, X_val=val)  # labels come from the folders (ImageFolder.targets)

        flagged = np.flatnonzero(cleaner.label_issues_)
        print(f"{len(train)} training images in {len(train.classes)} classes; {flagged.size} flagged "
              f"(validation accuracy {cleaner.history_['valid_accuracy'][-1]:.3f}).")
        for i in flagged[np.argsort(cleaner.label_quality_[flagged])][:10]:
            path, label = train.samples[i]
            suggested = train.classes[cleaner.suggested_label_[i]]
            print(f"  {Path(path).relative_to(root)}: filed under {train.classes[label]}, suggested {suggested}")
        if noisy is not None:
            caught = int(noisy[flagged].sum())
            print(f"Of the {int(noisy.sum())} misfiled images, {caught} are among the flagged.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=None, help="holds train/ and val/ class folders")
    parser.add_argument("--small", action="store_true", help="a quick run (tests)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args()
    main(args.root, args.small, args.workers)
