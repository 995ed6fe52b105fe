"""Built-in modality readers: ``ecg`` (WFDB), ``cxr`` (JPEG/PNG), ``lab`` (Symile-MIMIC CSV)."""
