"""Exporters: PNG, DICOM, masks, COCO boxes, the Parquet manifest and the dataset card."""
