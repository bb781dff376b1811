"""Turn raw ECG sources (PTB-XL, DeepFake) into prepared datasets that search trials read by memory map."""
