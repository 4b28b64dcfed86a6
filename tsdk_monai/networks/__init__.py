"""tsdk_monai.networks"""
