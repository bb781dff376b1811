"""The facts every room shares: lead order, diagnostic classes, regression targets and their units."""

LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")  # DeepFake order
CLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
TARGETS: tuple[str, ...] = ("hr", "pr", "qrs", "qt")
TARGET_UNITS: dict[str, str] = {"hr": "bpm", "pr": "ms", "qrs": "ms", "qt": "ms"}
SIGNAL_UNITS = "mV"
RECORD_SECONDS = 10  # every record of every source: PTB-XL's and DeepFake's ECGs are 10 s long
