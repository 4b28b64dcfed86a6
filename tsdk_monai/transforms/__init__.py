"""tsdk_monai.transforms"""
