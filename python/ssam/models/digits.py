"""A small conv net for scikit-learn's 8x8 digits (the demo's model)."""

from torch import nn


class DigitsNet(nn.Module):
    """conv-BN-ReLU x2, pool, linear: ~20k parameters, 1x8x8 input, 10 classes."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class DigitsMLP(nn.Module):
    """Linear-ReLU x2, linear on the flattened 8x8 digit: every weight is a Linear one, so each
    ``ascent_backward`` mode applies to the whole model (~51k parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 2 * width),
            nn.ReLU(),
            nn.Linear(2 * width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x):
        return self.net(x)
