// An empty Python module (limited API, so one wheel serves every CPython >=
// 3.9). Importing it loads the shared library, whose static initialisers
// register the fastrnn ops with torch's dispatcher.
#pragma once
#include <Python.h>

#ifndef FASTRNN_MODULE_NAME
#error "define FASTRNN_MODULE_NAME before including this header"
#endif

#define FASTRNN_CAT(a, b) a##b
#define FASTRNN_INIT(name) FASTRNN_CAT(PyInit_, name)
#define FASTRNN_STR2(x) #x
#define FASTRNN_STR(x) FASTRNN_STR2(x)

static struct PyModuleDef fastrnn_module = {
    PyModuleDef_HEAD_INIT, FASTRNN_STR(FASTRNN_MODULE_NAME), nullptr, -1, nullptr,
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC FASTRNN_INIT(FASTRNN_MODULE_NAME)(void) {
  return PyModule_Create(&fastrnn_module);
}
