"""tsdk_monai.ssl"""
