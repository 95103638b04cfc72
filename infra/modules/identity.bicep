// The app's user-assigned managed identity. It exists before the app, so the role assignments that
// the app needs at its first start (storage, Key Vault, Application Insights) are made without waiting on it.

param name string
param location string
param tags object

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
