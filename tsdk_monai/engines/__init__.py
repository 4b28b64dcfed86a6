"""tsdk_monai.engines"""
